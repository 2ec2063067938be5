"""Ulysses sequence parallelism (DeepSpeed-Ulysses) on torch.distributed: the token sequence is split
over the P ranks of a process group, and attention trades the split of the sequence for a split of the
heads.

Layout. A sequence of L tokens is padded at its end to Lp = P * ceil(L / P) tokens; rank r holds tokens
[r * Lp / P, (r + 1) * Lp / P), the last rank(s) some zero padding. Everything that works token by token
(projections, norms, modulation, FFN) runs on a rank's own tokens. Attention needs every token: one
all-to-all turns q, k, v [B, Lp / P, H, D] into [B, Lp, H / P, D] (all tokens, heads
[r * H / P, (r + 1) * H / P) on rank r), the padding is dropped, attention runs over exactly the L real
tokens, and a second all-to-all brings the output back to [B, Lp / P, H, D]. Since the padding never
takes part in attention, the result is the single-process one, whatever L and P.

Per layer each rank sends 3 + 1 messages of (P - 1) / P of its [B, Lp / P, H, D] activations, the same
whatever P: communication per rank stays flat while compute and activation memory per rank fall as
1 / P (see scripts/sp_memory_plan.py).
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass(frozen=True)
class SequenceShard:
    """Which tokens of a sequence of `length` tokens one rank of `degree` holds."""
    length: int
    degree: int
    rank: int

    @property
    def local_length(self):
        """Tokens per rank, padding included: ceil(length / degree)."""
        return -(-self.length // self.degree)

    @property
    def padded_length(self):
        return self.local_length * self.degree

    @property
    def start(self):
        return self.rank * self.local_length

    @property
    def num_real(self):
        """Real (not padding) tokens of this rank."""
        return max(0, min(self.length - self.start, self.local_length))

    def split(self, x, dim=1):
        """This rank's tokens of x (`length` tokens along `dim`), zero-padded to `local_length`."""
        if x.shape[dim] != self.length:
            raise ValueError(f"expected {self.length} tokens along dim {dim}, got shape {tuple(x.shape)}")
        local = x.narrow(dim, min(self.start, self.length), self.num_real)
        missing = self.local_length - self.num_real
        if not missing:
            return local
        pad = [0, 0] * (x.ndim - 1 - dim % x.ndim) + [0, missing]
        return F.pad(local, pad)

    def gather(self, x, group, dim=1):
        """Every rank's tokens x [..., local_length (at dim), ...] -> the whole sequence, padding dropped."""
        parts = [torch.empty_like(x) for _ in range(self.degree)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim).narrow(dim, 0, self.length)


def _all_to_all(x, group):
    """x [P, ...]: sends x[i] to rank i; returns [P, ...] with out[j] received from rank j."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def seq_to_head(x, group):
    """[B, Lp / P, H, D] (a rank's tokens, all heads) -> [B, Lp, H / P, D] (all tokens, a rank's heads)."""
    degree = dist.get_world_size(group)
    b, n, h, d = x.shape
    x = x.reshape(b, n, degree, h // degree, d).permute(2, 0, 1, 3, 4)   # [P (head group), B, n, H/P, D]
    return _all_to_all(x, group).permute(1, 0, 2, 3, 4).reshape(b, degree * n, h // degree, d)


def head_to_seq(x, group):
    """[B, Lp, H / P, D] (all tokens, a rank's heads) -> [B, Lp / P, H, D] (a rank's tokens, all heads)."""
    degree = dist.get_world_size(group)
    b, length, h, d = x.shape
    x = x.reshape(b, degree, length // degree, h, d).transpose(0, 1)     # [P (token chunk), B, n, H/P, D]
    return _all_to_all(x, group).permute(1, 2, 0, 3, 4).reshape(b, length // degree, degree * h, d)


def ulysses_attention(attend, q, k, v, shard, group, *args, **kwargs):
    """Runs `attend` (attention over a whole sequence, [B, L, h, D] in and out) on sequence-split inputs.

    q, k, v: [B, shard.local_length, H, D], this rank's tokens.  H must be divisible by the group's size.
    `attend(q, k, v, *args, **kwargs)` sees all `shard.length` real tokens and H / P heads, so masks and
    caches it applies are those of the whole sequence (a KV cache holds this rank's heads).
    Returns [B, shard.local_length, H, D], this rank's tokens (zeros on padding).
    """
    if q.requires_grad:
        raise NotImplementedError("Ulysses sequence parallelism is implemented for inference only "
                                  "(its collectives do not carry gradients)")
    qkv = seq_to_head(torch.cat([q, k, v]), group)[:, :shard.length]
    out = attend(*qkv.chunk(3), *args, **kwargs)
    return head_to_seq(F.pad(out, (0, 0, 0, 0, 0, shard.padded_length - shard.length)), group)
