"""One attention entry point for self, cross, masked and causal attention.

Inputs use the layout of the Wan modules, [B, L, H, D]. On CUDA with half-precision inputs and no
mask, flash-attn 3 (Hopper) or 2 is used when installed; everything else goes through PyTorch's
`scaled_dot_product_attention`, which picks its own fused kernel (cuDNN, efficient, flash, or the
CPU kernel).
"""

import torch
import torch.nn.functional as F

try:  # flash-attn 3 ships its Hopper kernels as `flash_attn_interface`
    import flash_attn_interface as _fa3
except ImportError:
    _fa3 = None
try:
    import flash_attn as _fa2
except ImportError:
    _fa2 = None

# Tests switch this off to compare the fallback against the fast path on the same inputs.
USE_FLASH_ATTN = True


def flash_available(q):
    return USE_FLASH_ATTN and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and (
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
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    return out.transpose(1, 2)
