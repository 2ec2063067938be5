"""One attention entry point for self, cross, masked and causal attention.

Inputs use the layout of the Wan modules, [B, L, H, D]. The backend is chosen with
`set_attention_backend` (or the `attention_backend` context manager):
  auto   flash-attn 3 (Hopper) or 2 when installed, for CUDA half-precision inputs without a mask;
         everything else (e.g. the masked text cross-attention) through PyTorch's
         `scaled_dot_product_attention`, which picks its own kernel
  cudnn  SDPA restricted to the cuDNN kernel (fast on Hopper with PyTorch >= 2.5)
  sdpa   SDPA with its own kernel choice, never flash-attn
  math   SDPA's reference math kernel (for comparisons)
"""

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:  # flash-attn 3 ships its Hopper kernels as `flash_attn_interface`
    import flash_attn_interface as _fa3
except ImportError:
    _fa3 = None
try:
    import flash_attn as _fa2
except ImportError:
    _fa2 = None

BACKENDS = ("auto", "cudnn", "sdpa", "math")
_SDPA_KERNELS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
_backend = "auto"


def set_attention_backend(name):
    """Selects the attention kernel of every later call (see the module docstring)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend '{name}'; expected one of {', '.join(BACKENDS)}")
    _backend = name


@contextlib.contextmanager
def attention_backend(name):
    previous = _backend
    set_attention_backend(name)
    try:
        yield
    finally:
        set_attention_backend(previous)


def flash_available(q):
    return _backend == "auto" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and (
        _fa3 is not None or _fa2 is not None)


def attention(q, k, v, attn_mask=None, is_causal=False, scale=None):
    """Scaled dot-product attention.

    Args:
        q: [B, Lq, H, D]; k, v: [B, Lk, H, D].
        attn_mask: optional bool (True = attend) or additive float mask broadcastable to
            [B, H, Lq, Lk].
        is_causal: token-causal attention (query i sees keys <= i), aligned to the end of k.
    Returns:
        [B, Lq, H, D] in the dtype of q.
    """
    if attn_mask is None and flash_available(q) and q.dtype == k.dtype == v.dtype:
        if _fa3 is not None:
            out = _fa3.flash_attn_func(q, k, v, softmax_scale=scale, causal=is_causal)
            return out[0] if isinstance(out, tuple) else out
        return _fa2.flash_attn_func(q, k, v, softmax_scale=scale, causal=is_causal)
    kernel = _SDPA_KERNELS.get(_backend)
    with sdpa_kernel(kernel) if kernel is not None else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    return out.transpose(1, 2)
