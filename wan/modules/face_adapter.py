"""Wan2.2-Animate's face path after the motion encoder: the temporal face encoder and the face
adapter blocks that inject its tokens into the DiT (official key names `face_encoder.*`,
`face_adapter.fuser_blocks.{n}.*`).

FaceEncoder: motion vectors [B, T, 512] -> [B, T', 5, dim] with T' = ceil(ceil(T / 2) / 2) (two
stride-2 causal convs): 4 token groups from a causal conv to 4 x width, LayerNorm / SiLU, the
strided convs at `width` (1024 in the release), a linear to dim, plus one learned padding token.
FaceBlock: the video tokens of latent frame l attend (no RoPE, no mask) to the 5 face tokens of
frame l; q and k get per-head RMSNorm; the output is a residual added after the DiT block.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention
from .norms import LayerNorm, RMSNorm


class CausalConv1d(nn.Module):
    """Conv1d over time, left-padded by replicating the first frame (key `conv`)."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride)

    def forward(self, x):
        """x [N, C, T] -> [N, C', ceil(T / stride)]."""
        return self.conv(F.pad(x, (self.conv.kernel_size[0] - 1, 0), mode="replicate"))


class FaceEncoder(nn.Module):
    def __init__(self, in_dim, dim, num_tokens=4, width=1024):
        super().__init__()
        self.num_tokens = num_tokens
        self.conv1_local = CausalConv1d(in_dim, width * num_tokens, 3)
        self.conv2 = CausalConv1d(width, width, 3, stride=2)
        self.conv3 = CausalConv1d(width, width, 3, stride=2)
        self.norm = LayerNorm(width)
        self.out_proj = nn.Linear(width, dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, motion):
        """motion [B, T, in_dim] -> face tokens [B, T', num_tokens + 1, dim]."""
        b = motion.shape[0]
        x = self.conv1_local(motion.transpose(1, 2).to(self.out_proj.weight.dtype))
        x = x.unflatten(1, (self.num_tokens, -1)).flatten(0, 1)  # [B * tokens, width, T]
        x = F.silu(self.norm(x.transpose(1, 2))).transpose(1, 2)
        x = F.silu(self.norm(self.conv2(x).transpose(1, 2))).transpose(1, 2)
        x = F.silu(self.norm(self.conv3(x).transpose(1, 2)))
        x = self.out_proj(x).unflatten(0, (b, self.num_tokens)).transpose(1, 2)  # [B, T', tokens, dim]
        padding = self.padding_tokens.expand(b, x.shape[1], 1, -1).to(x.dtype)
        return torch.cat([x, padding], dim=2)


class FaceBlock(nn.Module):
    def __init__(self, dim, num_heads, eps=1e-6):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.linear1_kv = nn.Linear(dim, dim * 2)
        self.linear1_q = nn.Linear(dim, dim)
        self.linear2 = nn.Linear(dim, dim)
        self.q_norm = RMSNorm(head_dim, eps=eps)
        self.k_norm = RMSNorm(head_dim, eps=eps)
        self.norm = LayerNorm(dim, eps)

    def forward(self, x, faces):
        """x [B, L, C] fp32 video tokens, L = F * tokens per frame; faces [B, F, N, C] -> residual [B, L, C] fp32."""
        b, frames, n, _ = faces.shape
        if x.shape[1] % frames:
            raise ValueError(f"{x.shape[1]} video tokens do not split into the {frames} frames of face tokens")
        dtype = self.linear1_q.weight.dtype
        k, v = self.linear1_kv(self.norm(faces).to(dtype)).unflatten(-1, (2, self.num_heads, -1)).unbind(3)
        q = self.linear1_q(self.norm(x).to(dtype)).unflatten(-1, (self.num_heads, -1))
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        q = q.unflatten(1, (frames, -1)).flatten(0, 1)  # [B * F, tokens per frame, H, D]
        out = attention(q, k.flatten(0, 1), v.flatten(0, 1))
        return self.linear2(out.flatten(2).unflatten(0, (b, frames)).flatten(1, 2)).float()


class FaceAdapter(nn.Module):
    def __init__(self, dim, num_heads, num_layers):
        super().__init__()
        self.fuser_blocks = nn.ModuleList([FaceBlock(dim, num_heads) for _ in range(num_layers)])
