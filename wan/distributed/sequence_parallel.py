"""Ulysses sequence parallelism applied to Wan models from outside (torchtitan style): the model code
is unchanged; hooks split the token sequence at the first transformer block and gather it after the
output head, and every self-attention's `attend` is wrapped with the all-to-all of `ulysses`.

    apply_sequence_parallel(dit, group)   # a WanModel, or a module holding some (WanMoE, CausalWanModel)
    out = dit(x, t, context)              # on every rank of the group: same inputs, same whole output

What runs where, for P ranks and L tokens:
- patch, text and time embedding: replicated, whole sequence (the per-token time embeddings of TI2V
  and of the causal model's per-frame timesteps are computed for every token, then sliced);
- the blocks: each rank its L / P tokens (`SequenceShard`), with the RoPE angles and per-token
  modulation of the tokens' global positions. Self-attention goes through the all-to-all and sees the
  whole sequence with H / P heads, so attention masks (block-causal, local windows) are the
  single-process ones. Cross-attention needs no communication: a rank's queries attend to the whole
  prompt;
- the head on each rank's tokens, then one all-gather of its small output [B, L, prod(patch) * out_dim]:
  every rank returns the whole prediction, so samplers and VAEs run unchanged on every rank.

Causal KV cache (`CausalWanModel.forward_block`): kept head-split. Attention hands the cache the whole
block (its frame bookkeeping unchanged) with this rank's H / P heads, so each rank's cache holds 1 / P
of the single-process cache, and rolling windows and sink re-rotation work per head as before.
"""

from functools import partial

import torch.distributed as dist

from wan.modules.model import WanModel

from .ulysses import SequenceShard, ulysses_attention


class SequenceParallel:
    """The hooks and the attention wrapper of one WanModel; `shard` is the `SequenceShard` of the
    forward in flight (set by the first block)."""

    def __init__(self, group=None):
        self.group = group
        self.degree = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.shard = None

    def per_token(self, e):
        """Modulation [B, L or 1, ...] -> this rank's [B, L / P or 1, ...]."""
        return e if e.shape[1] == 1 else self.shard.split(e)

    def before_block(self, first, block, args, kwargs):
        """Block inputs (x, e, rope, ...): x [B, L, C] (first block: the whole sequence, split here;
        later blocks: already this rank's [B, L / P, C]), e [B, L or 1, 6, C], rope (cos, sin) [L, 1, D/2]."""
        if len(args) < 3:
            raise TypeError("sequence parallelism needs a block's x, e and rope passed positionally")
        x, e, rope, *rest = args
        if first:
            self.shard = SequenceShard(x.shape[1], self.degree, self.rank)
            x = self.shard.split(x)
        elif self.shard is None or x.shape[1] != self.shard.local_length:
            raise RuntimeError("a sequence-parallel block got tokens not split by the model's first block")
        rope = tuple(self.shard.split(r, dim=0) for r in rope)
        return (x, self.per_token(e), rope, *rest), kwargs

    def before_head(self, head, args):
        """Head inputs: this rank's x [B, L / P, C], e [B, L or 1, C]."""
        x, e = args
        return x, self.per_token(e)

    def after_head(self, head, args, out):
        """This rank's head output [B, L / P, K] -> the whole sequence's [B, L, K]."""
        return self.shard.gather(out, self.group)

    def attend(self, attend, q, k, v, *args, **kwargs):
        return ulysses_attention(attend, q, k, v, self.shard, self.group, *args, **kwargs)


def apply_sequence_parallel(model, group=None):
    """Ulysses sequence parallelism over `group` (default: the whole world) for every `WanModel` in
    `model`. The group's size must divide the number of attention heads. Inference only. Returns model."""
    degree = dist.get_world_size(group)
    models = [m for m in model.modules() if isinstance(m, WanModel)]
    if not models:
        raise ValueError(f"no WanModel in {type(model).__name__} to apply sequence parallelism to")
    for wan in models:
        if wan.num_heads % degree:
            raise ValueError(f"the Ulysses degree ({degree}) must divide the DiT's {wan.num_heads} attention heads; "
                             f"use one of {[d for d in range(1, wan.num_heads + 1) if wan.num_heads % d == 0]}")
        if "attend" in vars(wan.blocks[0].self_attn):
            raise ValueError("this model's attention is already wrapped (sequence parallelism applied twice?)")
    for wan in models:
        plan = SequenceParallel(group)
        for i, block in enumerate(wan.blocks):
            block.register_forward_pre_hook(partial(plan.before_block, i == 0), with_kwargs=True)
            block.self_attn.attend = partial(plan.attend, block.self_attn.attend)
        wan.head.register_forward_pre_hook(plan.before_head)
        wan.head.register_forward_hook(plan.after_head)
    return model
