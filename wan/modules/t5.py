"""umT5 encoder, the text encoder of Wan, with the key names of `models_t5_umt5-xxl-enc-bf16.pth`.

Where T5 differs from a textbook transformer: a scale-only RMS norm, attention logits that are not
scaled by 1/sqrt(head_dim), no absolute positions but a learned bias per bucket of query-key
distance added to the logits (umT5 learns one table per layer: `shared_pos=False`), and a gated
tanh-GELU feed-forward without biases.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import load_model
from ..convert.encoders_hf import is_hf_t5, t5_from_hf
from .attention import attention
from .norms import RMSNorm


def clamp_fp16(x):
    """fp16 T5 activations can overflow; the official code pulls infinities back into range."""
    if x.dtype == torch.float16 and torch.isinf(x).any():
        bound = torch.finfo(x.dtype).max - 1000
        x = x.clamp(-bound, bound)
    return x


class T5RelativeEmbedding(nn.Module):
    """Bidirectional relative position bias: one learned value per (distance bucket, head).

    Half the buckets are for keys before the query, half for keys after. Within each half, small
    distances get a bucket each and larger ones share log-spaced buckets up to `max_dist`.
    """

    def __init__(self, num_buckets, num_heads, max_dist=128):
        super().__init__()
        self.num_buckets = num_buckets
        self.max_dist = max_dist
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def buckets(self, rel_pos):
        """rel_pos: integer key - query offsets -> bucket indices of the same shape."""
        half = self.num_buckets // 2
        side = (rel_pos > 0).long() * half
        dist = rel_pos.abs()
        exact = half // 2
        # The log is only used where dist >= exact; clamping keeps log(0) out of the other lanes.
        log_ratio = torch.log(dist.clamp(min=1).float() / exact) / math.log(self.max_dist / exact)
        far = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
        return side + torch.where(dist < exact, dist, far)

    def forward(self, length):
        """length: L -> additive attention bias [1, H, L, L] in the embedding's dtype."""
        pos = torch.arange(length, device=self.embedding.weight.device)
        bias = self.embedding(self.buckets(pos[None, :] - pos[:, None]))  # [Lq, Lk, H]
        return bias.permute(2, 0, 1).unsqueeze(0)


class T5Attention(nn.Module):
    def __init__(self, dim, dim_attn, num_heads, dropout=0.1):
        super().__init__()
        if dim_attn % num_heads:
            raise ValueError(f"dim_attn {dim_attn} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, bias):
        """x: [B, L, C]; bias: additive logits bias broadcastable to [B, H, L, L] -> [B, L, C]."""
        q, k, v = (proj(x).unflatten(-1, (self.num_heads, -1)) for proj in (self.q, self.k, self.v))
        out = attention(q, k, v, attn_mask=bias, scale=1.0)  # T5 folds the scaling into its weights
        return self.dropout(self.o(out.flatten(2)))


class T5FeedForward(nn.Module):
    """fc2(fc1(x) * gelu_tanh(gate(x))); `gate.0` is the official key of the gate projection."""

    def __init__(self, dim, dim_ffn, dropout=0.1):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        """x: [B, L, C] -> [B, L, C]."""
        return self.dropout(self.fc2(self.dropout(self.fc1(x) * self.gate(x))))


class T5Block(nn.Module):
    """Pre-norm self-attention and feed-forward; holds its own position bias table unless shared."""

    def __init__(self, dim, dim_attn, dim_ffn, num_heads, num_buckets, shared_pos, dropout):
        super().__init__()
        self.norm1 = RMSNorm(dim, eps=1e-6)
        self.attn = T5Attention(dim, dim_attn, num_heads, dropout)
        self.norm2 = RMSNorm(dim, eps=1e-6)
        self.ffn = T5FeedForward(dim, dim_ffn, dropout)
        self.pos_embedding = None if shared_pos else T5RelativeEmbedding(num_buckets, num_heads)

    def forward(self, x, key_bias=None, pos_bias=None):
        """x: [B, L, C]; key_bias: [B, 1, 1, L] padding mask bias; pos_bias: [1, H, L, L] if shared."""
        if self.pos_embedding is not None:
            pos_bias = self.pos_embedding(x.shape[1])
        bias = pos_bias if key_bias is None else pos_bias + key_bias
        x = clamp_fp16(x + self.attn(self.norm1(x), bias))
        return clamp_fp16(x + self.ffn(self.norm2(x)))


class T5Encoder(nn.Module):
    """T5 encoder; the defaults are umT5-XXL (5.7B parameters, 4096-dim outputs).

    Args use the official names: `vocab` (size), `dim`, `dim_attn` (all heads together),
    `dim_ffn`, `num_heads`, `num_layers`, `num_buckets` (relative position buckets),
    `shared_pos` (one position table for all layers, as T5 1.1; umT5 has one per layer),
    `dropout`.
    """

    def __init__(self, vocab=256384, dim=4096, dim_attn=4096, dim_ffn=10240, num_heads=64, num_layers=24,
                 num_buckets=32, shared_pos=False, dropout=0.1):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.token_embedding = nn.Embedding(vocab, dim)
        self.pos_embedding = T5RelativeEmbedding(num_buckets, num_heads) if shared_pos else None
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            T5Block(dim, dim_attn, dim_ffn, num_heads, num_buckets, shared_pos, dropout) for _ in range(num_layers))
        self.norm = RMSNorm(dim, eps=1e-6)

    def forward(self, ids, mask=None):
        """ids: [B, L] token ids; mask: [B, L], nonzero on tokens and 0 on padding -> [B, L, dim].

        Padded positions are masked as keys only, so real tokens never see them; the hidden states
        at padded positions are computed but meaningless.
        """
        x = self.dropout(self.token_embedding(ids))
        key_bias = None
        if mask is not None:
            # The dtype's lowest finite value rather than -inf keeps fully padded rows NaN-free.
            key_bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
            key_bias = key_bias.masked_fill(mask == 0, torch.finfo(x.dtype).min)[:, None, None, :]
        pos_bias = self.pos_embedding(ids.shape[1]) if self.pos_embedding is not None else None
        for block in self.blocks:
            x = block(x, key_bias, pos_bias)
        return self.dropout(self.norm(x))


def load_t5_encoder(path, dtype=torch.bfloat16, device="cpu", **config):
    """Builds a `T5Encoder(**config)` on the meta device and fills it strictly from `path` (the
    official `.pth`, or a transformers `UMT5EncoderModel` checkpoint in a diffusers folder).

    Returns the model in eval mode with gradients off, on `device` in `dtype`.
    """
    model = load_model(lambda: T5Encoder(**config), path, dtype=dtype, device=device,
                       convert=lambda state: t5_from_hf(state) if is_hf_t5(state) else state)
    return model.eval().requires_grad_(False)
