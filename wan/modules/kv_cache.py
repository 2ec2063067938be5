"""Key/value caches of block-by-block causal generation: self-attention over earlier frames, and
cross-attention to the prompt.

`KVCache` holds one generation stream (one CFG branch has one): for every transformer layer a
`LayerKVCache` with the rotated keys and the values of the frames it keeps, in frame slots
[B, frames, tokens_per_frame, H, D]. Before every forward of a block the model calls
`begin_block(start, num_frames, tokens_per_frame)`; the forward writes the block's keys and values
into the block's slots and attends over every slot in use. A denoising step of the same block writes
the same slots again, so the block's last forward (the rerun of the finished block at the context
timestep) is what later blocks see.

Rolling window. With `local_attn_size` L (latent frames; -1: unbounded) and `sink_size` S, a block
sees the first S frames of the video and the most recent L - S frames, its own included: L frames at
most, so memory and the cost of a step stay flat however long the video. A new block takes the slots
of the frames that fall out of the window. Keys carry their positions in their rotation, so the order
of the slots does not matter to attention and sliding the window moves nothing.

RoPE past the reference's 1024 frames. Keys and queries are rotated at their absolute frame index,
computed in float64 from the index (`rope.rope_cos_sin`), not read from a 1024-row table: there is no
limit and nothing wraps around. RoPE logits depend only on the difference of the query's and the key's
positions, so this is exactly RoPE by position within the attended window, without re-rotating the
window as it slides. The sink is the exception: its frames stay while the window moves on, and at
their own positions they would drift ever further from the queries, to distances never seen in
training (Self-Forcing trains on 21-frame clips), which degrades them from useful anchors to noise.
We number the window as StreamingLLM does: sink frames sit right before the oldest kept frame. Each
time the window slides, the sink keys are re-rotated by the number of frames evicted so far, from a
copy taken before the first slide (so bf16 rounding does not pile up over thousands of slides).
Quality: with a window every query-key distance stays below L, as in training, for any length. With
an unbounded window distances grow with the video, as in the reference; they leave the training range
after ~21 frames, so use a window for long videos. Without a sink, and with a sink until the window
first slides, the result equals absolute positions, i.e. the block-causal full-clip forward.

Training through the cache (Self-Forcing's rollouts). The buffers never carry autograd history: a
block's keys and values are written detached. A forward that autograd records attends through a
`BlockAttention` instead: over the earlier frames as they are at that moment (detached) plus the
block's own live keys and values, so the gradient reaches the block's forward and nothing earlier.
With an unbounded window the earlier frames are a view of the buffers (their slots are never written
again); a rolling window may overwrite them, so they are copied. The same earlier frames serve the
recomputation of activation checkpointing in backward, however far the cache has moved on by then.

Static shapes (`KVCache(..., static_shapes=True)`, inference). The plain cache writes slot runs and
attends over the slots in use, `k[:, :used]`: shapes that change from block to block. The static
mode allocates every slot at once (the window, or `num_frames` for an unbounded window), writes a
block with `index_copy_` at a tensor of slot indices and attends over all slots with a boolean mask
of the slots in use, so every denoising step of a block size has the same shapes and reads the same
tensors (the index and the mask are updated in place by `begin_block`): what CUDA graphs
(`torch.compile(mode="reduce-overhead")`) need. The host-side work stays once per block, outside the
steps: `begin_block`'s bookkeeping and, with a sink, the sink keys' re-rotation on the first forward
of a block that slides the window. The masked attention cannot use flash-attn (SDPA's
memory-efficient or cuDNN kernel runs instead) and computes the unused slots until the window is full.
"""

from collections import deque

import torch

from .attention import attention
from .rope import apply_rope, rope_cos_sin


def frame_runs(slots):
    """Groups frame slots into contiguous runs: [(first slot, first frame of the block, length)]."""
    runs = []
    for frame, slot in enumerate(slots):
        if runs and runs[-1][0] + runs[-1][2] == slot:
            runs[-1][2] += 1
        else:
            runs.append([slot, frame, 1])
    return runs


class KVCache:
    """Self-attention cache of one generation stream: the frame-slot bookkeeping shared by all layers,
    and one `LayerKVCache` per layer in `layers`."""

    def __init__(self, num_layers, local_attn_size=-1, sink_size=0, num_frames=None, static_shapes=False):
        """num_frames: frames to allocate for at once (an unbounded window otherwise grows by doubling).
        static_shapes: fixed-shape writes and attention (see the module docstring)."""
        if local_attn_size != -1 and not 0 <= sink_size < local_attn_size:
            raise ValueError(f"sink_size {sink_size} must be in [0, local_attn_size {local_attn_size})")
        if static_shapes and local_attn_size == -1 and not num_frames:
            raise ValueError("static_shapes with an unbounded window needs num_frames (the video's length) "
                             "to allocate the cache at once; pass num_frames or set local_attn_size")
        self.static_shapes = static_shapes
        self.slot_index = None               # static shapes: [F] long, slot of each frame of the block
        self.slot_in_use = None              # static shapes: [capacity] bool
        self.window = local_attn_size
        self.sink = sink_size
        self.num_frames_hint = num_frames or 0
        self.layers = [LayerKVCache(self) for _ in range(num_layers)]
        self.reset()

    def reset(self):
        """Forgets the video: the next block must start at frame 0."""
        self.start, self.num_frames = 0, 0   # the block being generated
        self.tokens_per_frame = None
        self.used = 0                        # slots in use, a prefix of the buffers; the block's included
        self.slots = []                      # slot of each frame of the block
        self.runs = []                       # `slots` as contiguous runs
        self.recent = deque()                # slots of the kept frames past the sink, oldest first
        self.evicted = 0                     # frames evicted so far: how far the sink is moved
        for layer in self.layers:
            layer.clear()

    @property
    def capacity(self):
        """Frame slots the buffers need now."""
        return max(self.used, self.num_frames_hint) if self.window == -1 else self.window

    def begin_block(self, start, num_frames, tokens_per_frame):
        """Prepares a forward of the block of `num_frames` frames from frame `start`: the current block
        again (another denoising step), or the next one, which makes the current block history."""
        if (start, num_frames) == (self.start, self.num_frames):
            return
        expected = self.start + self.num_frames
        if start != expected:
            raise ValueError(f"blocks must follow each other: expected a block at frame {expected} (or "
                             f"{self.start} again), got {start}; reset() the cache to start a new video")
        if self.tokens_per_frame not in (None, tokens_per_frame):
            raise ValueError(f"{tokens_per_frame} tokens per frame, but this video has {self.tokens_per_frame}")
        if self.window != -1 and num_frames > self.window - self.sink:
            raise ValueError(f"a block of {num_frames} frames does not fit local_attn_size {self.window} "
                             f"with sink_size {self.sink}")
        self.tokens_per_frame = tokens_per_frame
        self.recent.extend(slot for frame, slot in enumerate(self.slots, self.start) if frame >= self.sink)
        free = num_frames if self.window == -1 else min(num_frames, self.window - self.used)
        evict = num_frames - free
        self.slots = list(range(self.used, self.used + free)) + [self.recent.popleft() for _ in range(evict)]
        self.runs = frame_runs(self.slots)
        self.used += free
        self.evicted += evict
        self.start, self.num_frames = start, num_frames
        if self.static_shapes:
            if self.used > self.capacity:
                raise ValueError(f"the video is longer than the num_frames {self.num_frames_hint} this static "
                                 f"cache was allocated for")
            self.slot_index = _update_in_place(self.slot_index, torch.tensor(self.slots))
            self.slot_in_use = _update_in_place(self.slot_in_use, torch.arange(self.capacity) < self.used)

    def static_tensors(self, device):
        """(slot_index, slot_in_use) on `device`: moved there once, then updated in place."""
        if self.slot_index.device != device:
            self.slot_index, self.slot_in_use = self.slot_index.to(device), self.slot_in_use.to(device)
        return self.slot_index, self.slot_in_use

    def memory_bytes(self):
        """Bytes held by the cache's tensors."""
        return sum(layer.memory_bytes() for layer in self.layers)


def _update_in_place(buffer, values):
    """`values` written into `buffer` when the shapes match (so a captured graph keeps reading it)."""
    if buffer is None or buffer.shape != values.shape:
        return values if buffer is None else values.to(buffer.device)
    return buffer.copy_(values)


class LayerKVCache:
    """The keys and values of one layer; `attend` is what `SelfAttention` calls in place of attention."""

    def __init__(self, stream):
        self.stream = stream
        self.clear()

    def clear(self):
        self.k = self.v = None       # [B, slots, tokens_per_frame, H, D]
        self.sink_k = None           # sink keys at their own positions, kept once the window slides
        self.sink_shift = 0          # frames the sink keys in `k` are moved by

    def memory_bytes(self):
        tensors = [t for t in (self.k, self.v, self.sink_k) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def attend(self, q, k, v):
        """q, k, v [B, F * tokens_per_frame, H, D] of the current block (q and k rotated at their
        absolute frame positions) -> attention over the kept frames and the block, [B, F * tpf, H, D]."""
        self.write(k, v)
        stream = self.stream
        if stream.static_shapes:
            _, in_use = stream.static_tensors(q.device)
            mask = in_use[:, None].expand(-1, stream.tokens_per_frame).reshape(1, 1, 1, -1)  # [1, 1, 1, Lk]
            return attention(q, self.k.flatten(1, 2), self.v.flatten(1, 2), attn_mask=mask)
        used = stream.used
        return attention(q, self.k[:, :used].flatten(1, 2), self.v[:, :used].flatten(1, 2))

    def write(self, k, v):
        """Stores the current block's keys and values [B, F * tokens_per_frame, H, D], detached."""
        stream = self.stream
        self._prepare(k)
        k, v = (x.detach().unflatten(1, (stream.num_frames, stream.tokens_per_frame)) for x in (k, v))
        if stream.static_shapes:
            index, _ = stream.static_tensors(k.device)
            self.k.index_copy_(1, index, k.to(self.k.dtype))
            self.v.index_copy_(1, index, v.to(self.v.dtype))
            return
        for slot, frame, n in stream.runs:
            self.k[:, slot:slot + n] = k[:, frame:frame + n]
            self.v[:, slot:slot + n] = v[:, frame:frame + n]

    def earlier_frames(self, like):
        """Keys and values [B, L, H, D] of the kept frames other than the current block's, detached: a
        view where no later block can overwrite them (unbounded window), else a copy."""
        stream = self.stream
        self._prepare(like)
        block = set(stream.slots)
        slots = [s for s in range(stream.used) if s not in block]
        if stream.window == -1 and slots == list(range(len(slots))):
            k, v = self.k[:, :len(slots)], self.v[:, :len(slots)]
        else:
            index = torch.tensor(slots, dtype=torch.long, device=self.k.device)
            k, v = self.k.index_select(1, index), self.v.index_select(1, index)
        return k.flatten(1, 2), v.flatten(1, 2)

    def _prepare(self, like):
        """Buffers big enough for the block, sink keys moved to the window's current position."""
        self._reserve(like, self.stream.capacity)
        if self.stream.sink and self.stream.evicted != self.sink_shift:
            self._move_sink(self.stream.evicted)

    def _reserve(self, like, frames):
        """Makes the buffers hold `frames` slots (doubling, for an unbounded window)."""
        have = 0 if self.k is None else self.k.shape[1]
        if have >= frames:
            return
        size = frames if self.stream.window != -1 else max(frames, 2 * have)
        shape = (like.shape[0], size, self.stream.tokens_per_frame, *like.shape[2:])
        grown = [like.new_zeros(shape) for _ in range(2)]
        if have:
            grown[0][:, :have] = self.k
            grown[1][:, :have] = self.v
        self.k, self.v = grown

    def _move_sink(self, shift):
        """Re-rotates the sink keys to sit `shift` frames later (see the module docstring)."""
        sink = self.stream.sink
        if self.sink_k is None:
            self.sink_k = self.k[:, :sink].clone()
        keys = self.sink_k.flatten(1, 2)
        offset = torch.tensor([[shift, 0, 0]], device=keys.device)
        cos, sin = (c.expand(keys.shape[1], -1, -1) for c in rope_cos_sin(offset, keys.shape[-1]))
        self.k[:, :sink] = apply_rope(keys, cos, sin).unflatten(1, self.sink_k.shape[1:3])
        self.sink_shift = shift


class BlockAttention:
    """One layer's attention in a block forward that autograd records (see the module docstring): the
    block's live keys and values after the earlier frames as the first call finds them. The first call
    also writes the block into the cache, detached; a second one (activation checkpointing recomputing
    the forward in backward) attends to the same earlier frames and writes nothing."""

    def __init__(self, layer):
        self.layer = layer
        self.earlier = None

    def attend(self, q, k, v):
        if self.earlier is None:
            self.earlier = self.layer.earlier_frames(k)
            self.layer.write(k, v)
        earlier_k, earlier_v = self.earlier
        return attention(q, torch.cat([earlier_k, k], 1), torch.cat([earlier_v, v], 1))


class CrossAttentionCache:
    """Cross-attention keys and values of one prompt for every layer, computed once and reused by
    every block and step. `layers[i]` is `blocks[i].cross_attn.context_kv(...)`."""

    def __init__(self, model, context, clip_fea=None):
        """model: a `WanModel`; context, clip_fea: as `WanModel.embed_context`."""
        embedded = model.embed_context(context, clip_fea)
        self.layers = [block.cross_attn.context_kv(embedded) for block in model.blocks]
