"""The text context of cross-attention, with its zero padding folded into one weighted key.

The official model zero-pads every prompt to `text_len` (512) tokens before `text_embedding` and
attends to all of them unmasked. All padding rows embed to the same vector, so their keys and
values are identical, and n identical keys act in softmax exactly like one key whose logit is
raised by log(n). We therefore keep each prompt's real tokens plus padding copies up to the
longest prompt + 1, and add log(n_pad / copies) to the logits of the copies: the same result as
the padded original, at a fraction of the text-embedding and cross-attention cost.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class CrossContext:
    """Embedded cross-attention inputs of one forward."""
    text: torch.Tensor                   # [B, Lk, C]
    text_bias: torch.Tensor = None       # [B, 1, 1, Lk] additive logit bias, or None
    # Extra cross-attention branches: name -> (tokens [B, Lb, C], mask broadcastable to
    # [B, H, L, Lb] or None); "img" holds Wan2.1's CLIP image tokens.
    branches: dict = field(default_factory=dict)


def fold_padding(context, text_len):
    """Zero-pads prompts for `text_len` semantics with one folded padding key.

    context: [B, L, D] (all rows count as tokens) or a list of [L_i, D].
    Returns (tokens [B, Lk, D], bias [B, Lk] fp32 or None when no prompt is padded).
    """
    rows = list(context.unbind(0)) if torch.is_tensor(context) else list(context)
    lengths = [r.shape[0] for r in rows]
    if max(lengths) > text_len:
        raise ValueError(f"text context has {max(lengths)} tokens, more than text_len {text_len}")
    if min(lengths) == text_len:
        return torch.stack(rows), None
    keys = max(lengths) + 1
    tokens = torch.stack([F.pad(r, (0, 0, 0, keys - r.shape[0])) for r in rows])
    bias = torch.zeros(len(rows), keys, device=tokens.device)
    for i, n in enumerate(lengths):
        # A full-length prompt has no padding: its filler slots are masked out instead.
        bias[i, n:] = math.log((text_len - n) / (keys - n)) if n < text_len else -math.inf
    return tokens, bias
