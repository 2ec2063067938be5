"""Normalization layers of the Wan DiT. Both normalize in fp32 whatever the parameter dtype.

Fast paths (on by default, `set_fused_norms(False)` restores the plain path; tested equal in
tests/test_performance.py):
  RMSNorm of an fp32 input with an fp32 weight: `F.rms_norm` with the weight folded in, PyTorch's
      fused kernel (forward as fast as three tensor passes, backward one kernel instead of the
      chain of elementwise gradients); half-precision inputs keep the official order (normalize
      in fp32, cast, then multiply).
  adaLN `LayerNorm.modulated` with one (shift, scale) row for every token: the modulation is passed
      to `F.layer_norm` as its affine weight and bias, one pass instead of a norm and an addcmul.
"""

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

_fused = True


def set_fused_norms(enabled):
    """Turns the norm fast paths (see the module docstring) on or off for every later call."""
    global _fused
    _fused = bool(enabled)


@contextlib.contextmanager
def fused_norms(enabled):
    previous = _fused
    set_fused_norms(enabled)
    try:
        yield
    finally:
        set_fused_norms(previous)


def modulate(x, shift, scale):
    """adaLN: x [B, L, C] fp32, shift/scale [B, L or 1, C] fp32."""
    return torch.addcmul(shift, x, 1 + scale)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim (used on q and k). Parameter name `weight` as the official model."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        """x: [..., C] -> [..., C] in the dtype of x."""
        if _fused and x.dtype == self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back to the input dtype."""

    def __init__(self, dim, eps=1e-6, elementwise_affine=False):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x):
        """x: [..., C] -> [..., C] in the dtype of x."""
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)

    def modulated(self, x, shift, scale):
        """adaLN `modulate(self(x), shift, scale)`: x [B, L, C] fp32, shift/scale [B, L or 1, C] fp32."""
        if _fused and self.weight is None and shift.shape[:-1].numel() == 1 and scale.shape[:-1].numel() == 1:
            return F.layer_norm(x.float(), self.normalized_shape, (1 + scale).reshape(-1), shift.reshape(-1),
                                self.eps)
        return modulate(self(x), shift, scale)
