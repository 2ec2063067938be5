"""Causal Wan: the Wan DiT made autoregressive over blocks of latent frames (CausVid, Self-Forcing).

Latent frames are grouped in blocks of `num_frame_per_block` (with `independent_first_frame`, a first
block of one frame, for image conditioning); every token attends to the tokens of its own block and
of earlier blocks, within a rolling window of `local_attn_size` frames plus `sink_size` first frames.

`CausalWanModel` wraps a `WanModel` and runs its stages and blocks unchanged: same parameters, and
its state dict is the WanModel's under a `model.` prefix, the layout of Self-Forcing's `generator`
checkpoints. Any Wan checkpoint loads through `load_dit` (`load_causal_dit`). Two forwards, same math:

- `forward`: a whole clip at once under the block-causal mask (training; the no-cache baseline);
- `forward_block`: one block, attending to earlier blocks through a `KVCache` and to the prompt
  through a `CrossAttentionCache` (inference, one block after another). Training rollouts
  (trainers/rollout.py) run it with autograd: see `kv_cache` for what the gradient reaches.

Positions: the block's frames are rotated at their absolute frame index, with no limit on the length;
how that behaves with a rolling window and sink is in `kv_cache`.
"""

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..model_loading import load_dit
from .kv_cache import BlockAttention, CrossAttentionCache, KVCache
from .rope import grid_positions, rope_cos_sin


class CausalWanModel(nn.Module):
    def __init__(self, model, num_frame_per_block=3, local_attn_size=-1, sink_size=0,
                 independent_first_frame=False):
        """model: the `WanModel` to run causally. local_attn_size: attention window in latent frames,
        -1 unbounded; it must hold the sink and a block. sink_size: first frames always attended to."""
        super().__init__()
        if num_frame_per_block < 1:
            raise ValueError(f"num_frame_per_block must be >= 1, got {num_frame_per_block}")
        if local_attn_size != -1 and not 0 <= sink_size <= local_attn_size - num_frame_per_block:
            raise ValueError(f"local_attn_size {local_attn_size} must hold sink_size {sink_size} plus a block "
                             f"of {num_frame_per_block} frames (or be -1, unbounded)")
        if any(block.self_attn.window_size != (-1, -1) for block in model.blocks):
            raise ValueError("token-local attention windows (window_size) are not supported causally")
        self.model = model
        self.num_frame_per_block = num_frame_per_block
        self.local_attn_size = local_attn_size
        self.sink_size = sink_size
        self.independent_first_frame = independent_first_frame
        self._block_rope = (None, None)  # (key, rope) of the last block: its steps share it

    def block_sizes(self, num_frames):
        """Frames per block of a video of `num_frames` latent frames: [1,] n, n, ..., and a shorter
        last block where n does not divide the rest."""
        first = [1] if self.independent_first_frame and num_frames > 0 else []
        rest = num_frames - len(first)
        n = self.num_frame_per_block
        return first + [n] * (rest // n) + ([rest % n] if rest % n else [])

    def attention_mask(self, num_frames, tokens_per_frame, device=None):
        """[L, L] bool, True where a query token may attend to a key token (L = frames * tokens)."""
        sizes = torch.tensor(self.block_sizes(num_frames), device=device)
        block_end = sizes.cumsum(0).repeat_interleave(sizes)[:, None]  # [F, 1] end of each frame's block
        key = torch.arange(num_frames, device=device)
        visible = key < block_end
        if self.local_attn_size != -1:
            visible &= (key >= block_end - (self.local_attn_size - self.sink_size)) | (key < self.sink_size)
        return visible.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)

    def embed_time(self, t, grid):
        """t [B] (one timestep for all frames) or [B, F] (per frame) of a token grid (F, h, w) ->
        (e [B, 1 or L, C], e0 [B, 1 or L, 6, C]); a per-frame timestep is embedded once per frame,
        then spread to the frame's tokens."""
        frames, tokens_per_frame = grid[0], grid[1] * grid[2]
        if t.ndim == 1:
            return self.model.embed_time(t, frames * tokens_per_frame)
        if t.shape[1:] != (frames,):
            raise ValueError(f"t must be [B] or [B, {frames}] (one per frame), got {tuple(t.shape)}")
        e, e0 = self.model.embed_time(t.flatten(), 1)
        return tuple(a.view(t.shape[0], frames, *a.shape[2:]).repeat_interleave(tokens_per_frame, 1)
                     for a in (e, e0))

    def embed_input(self, x, y=None, add_condition=None):
        """x [B, C, F, H, W] (+ condition channels y [B, Cy, F, H, W]) -> tokens [B, L, C] with the
        token condition add_condition [B, L, C] added (as `WanModel.forward`), and the grid."""
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        tokens, grid = self.model.embed_tokens(x)
        if add_condition is not None:
            if add_condition.shape[:2] != tokens.shape[:2]:
                raise ValueError(f"add_condition {tuple(add_condition.shape)} does not match the "
                                 f"{tuple(tokens.shape[:2])} (batch, tokens) of the input")
            tokens = tokens + add_condition.float()
        return tokens, grid

    def forward(self, x, t, context, clip_fea=None, *, y=None, add_condition=None):
        """Whole clip under the block-causal mask.
        x: [B, C, F, H, W].  t: [B] or [B, F].  context, clip_fea, y, add_condition: as `WanModel.forward`.
        Returns [B, out_dim, F, H, W] fp32."""
        model = self.model
        tokens, grid = self.embed_input(x, y, add_condition)
        e, e0 = self.embed_time(t, grid)
        mask = self.attention_mask(grid[0], grid[1] * grid[2], tokens.device)
        tokens = model.run_blocks(tokens, e0, model.rope(grid, tokens.device),
                                  model.embed_context(context, clip_fea), mask)
        return model.project_out(tokens, e, grid)

    def new_kv_cache(self, num_frames=None, static_shapes=False):
        """An empty self-attention cache for one generation stream (one per CFG branch); `num_frames`,
        the video's length if known, sizes an unbounded cache at once. static_shapes: fixed-shape
        cache steps for CUDA graphs (see `kv_cache`)."""
        return KVCache(len(self.model.blocks), self.local_attn_size, self.sink_size, num_frames, static_shapes)

    def cross_cache(self, context, clip_fea=None):
        """The prompt's cross-attention keys and values for every layer (once per prompt)."""
        return CrossAttentionCache(self.model, context, clip_fea)

    def forward_block(self, x, t, start, kv_cache, cross_cache=None, context=None, clip_fea=None, *, y=None,
                      add_condition=None):
        """One block over the cache of earlier blocks.
        x: [B, C, F, H, W], the block's F latent frames, which start at frame `start` of the video.
        t: [B] or [B, F].  Writes the block's keys and values into `kv_cache` (see `kv_cache`).
        cross_cache: the prompt's `cross_cache`; or else `context` (and `clip_fea`), embedded by this
            call (training, where FSDP gathers the sharded weights only inside a module's forward).
        y: the block's frames of the condition channels [B, Cy, F, H, W].  add_condition: the block's
            slice [B, L_block, C] of the video's token condition (e.g. pose tokens).
        With autograd recording, each layer attends through a `BlockAttention` and blocks marked for
        activation checkpointing are recomputed in backward.
        Returns [B, out_dim, F, H, W] fp32."""
        model = self.model
        tokens, grid = self.embed_input(x, y, add_condition)
        kv_cache.begin_block(start, grid[0], grid[1] * grid[2])
        e, e0 = self.embed_time(t, grid)
        rope = self.block_rope(grid, start, tokens.device)
        if cross_cache is None:
            context, cross_kvs = model.embed_context(context, clip_fea), [None] * len(model.blocks)
        else:
            context, cross_kvs = None, cross_cache.layers
        grad = torch.is_grad_enabled()
        for block, layer, cross_kv, ckpt in zip(model.blocks, kv_cache.layers, cross_kvs, model.gradient_checkpointing):
            if grad:
                layer = BlockAttention(layer)
            if grad and ckpt:
                tokens = checkpoint(block, tokens, e0, rope, context, None, layer, cross_kv, use_reentrant=False)
            else:
                tokens = block(tokens, e0, rope, context, kv_cache=layer, cross_kv=cross_kv)
        return model.project_out(tokens, e, grid)

    def block_rope(self, grid, start, device):
        """(cos, sin) of a block at absolute frame `start`. Not in WanModel's per-offset rope cache,
        which would grow with the video."""
        key = (grid, start, str(device))
        if self._block_rope[0] != key:
            positions = grid_positions(*grid, frame_offset=start, device=device)
            self._block_rope = (key, rope_cos_sin(positions, self.model.head_dim))
        return self._block_rope[1]


def load_causal_dit(path, config=None, dtype=None, device="cpu", nested_key=None, **causal):
    """`load_dit` (official, diffusers or Self-Forcing/CausVid checkpoints) wrapped in a
    `CausalWanModel`; `causal` are its options (num_frame_per_block, local_attn_size, ...)."""
    return CausalWanModel(load_dit(path, config, dtype, device, nested_key), **causal)
