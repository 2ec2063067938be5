"""StableAvatar's time-step-aware audio adapter ("vocal projector"): wav2vec2 features -> per latent
frame audio tokens for the DiT's `vocal` cross-attention branch.

1. a = LayerNorm(W_p w): wav2vec2 last hidden state [B, T, Ca] -> [B, T, C].
2. One window of n audio tokens per latent frame (`audio_windows`), centred on the frame's four
   video frames and widened by `expand_length` on both sides; rows outside the audio are dropped and
   replaced by zero rows at the end of the window.
3. Two blocks on the flattened windows [B, F*n, C], modulated by the DiT's time projection e0: an
   attention-free adaLN residual, cross-attention from frame f's audio tokens to frame f's noisy
   DiT tokens z (right after patch embedding), and an adaLN FFN.
4. An adaLN head modulated by the DiT's time embedding e -> [B, F, n, C].
Key names follow the released checkpoint (`vocal_projector.` inside the transformer file).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention
from .norms import LayerNorm, RMSNorm, modulate


def audio_window_ranges(num_tokens, num_frames, expand_length=4):
    """Inclusive [start, end] audio-token rows of each latent frame of a clip of `num_frames` video
    frames whose audio has `num_tokens` wav2vec2 tokens; may reach outside [0, num_tokens - 1].

    With r = tokens per video frame, latent frame i >= 1 is centred on floor((r(4i-3) + r(4i+1))/2) - 1
    with half-width floor(2r); frame 0 takes the 2 half-widths before frame 1's window."""
    per_frame = num_tokens / num_frames
    half = int(per_frame * 4 / 2)
    latent_frames = (num_frames - 1) // 4 + 1
    centres = [int((per_frame * ((i - 1) * 4 + 1) + per_frame * (i * 4 + 1)) / 2) - 1
               for i in range(1, max(latent_frames, 2))]
    ranges = [[centres[0] - 3 * half, centres[0] - half]] + [[c - half, c + half] for c in centres]
    return [[start - expand_length, end + expand_length] for start, end in ranges[:latent_frames]]


def audio_windows(tokens, ranges):
    """tokens [B, T, C], inclusive row ranges (all of one width n) -> windows [B, F, n, C] and the
    number of valid rows of each [F]. Out-of-range rows are dropped and zero rows appended at the end."""
    num_tokens = tokens.shape[1]
    windows, lengths = [], []
    for start, end in ranges:
        first, stop = max(start, 0), min(end, num_tokens - 1) + 1
        valid = tokens[:, first:max(stop, first)]  # a window wholly before the audio is all padding
        windows.append(F.pad(valid, (0, 0, 0, end - start + 1 - valid.shape[1])))
        lengths.append(valid.shape[1])
    return torch.stack(windows, dim=1), torch.tensor(lengths)


class LatentCrossAttention(nn.Module):
    """Audio tokens of each latent frame attend to that frame's DiT tokens."""

    def __init__(self, dim, context_dim, num_heads, eps=1e-6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"vocal projector width {dim} is not divisible by its {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(context_dim, dim)
        self.v = nn.Linear(context_dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps=eps)
        self.norm_k = RMSNorm(dim, eps=eps)

    def forward(self, x, latents, num_frames):
        """x [B, F*n, C] audio tokens, latents [B, F*m, Cz] DiT tokens (frame-major) -> [B, F*n, C]."""
        batch, length, dim = x.shape
        heads = (self.num_heads, dim // self.num_heads)
        q = self.norm_q(self.q(x)).reshape(batch * num_frames, length // num_frames, *heads)
        k = self.norm_k(self.k(latents)).reshape(batch * num_frames, latents.shape[1] // num_frames, *heads)
        v = self.v(latents).reshape(batch * num_frames, latents.shape[1] // num_frames, *heads)
        return self.o(attention(q, k, v).reshape(batch, length, dim))


class VocalBlock(nn.Module):
    def __init__(self, dim, context_dim, ffn_dim, num_heads, eps=1e-6):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps)
        self.norm3 = LayerNorm(dim, eps, elementwise_affine=True)
        self.cross_attn = LatentCrossAttention(dim, context_dim, num_heads, eps)
        self.norm2 = LayerNorm(dim, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def forward(self, x, e0, latents, num_frames):
        """x [B, F*n, C], e0 [B, 6, C] DiT time projection, latents [B, F*m, Cz] -> [B, F*n, C].
        The first adaLN residual has no attention (the released model's self-attention slot)."""
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation + e0).unsqueeze(2).unbind(1)
        x = x + modulate(self.norm1(x), shift_sa, scale_sa) * gate_sa
        x = x + self.cross_attn(self.norm3(x), latents, num_frames)
        return x + self.ffn(modulate(self.norm2(x), shift_ff, scale_ff)) * gate_ff


class VocalHead(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.norm = LayerNorm(dim, eps)
        self.final_proj = nn.Linear(dim, dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim ** 0.5)

    def forward(self, x, e):
        """x [B, L, C], e [B, C] DiT time embedding -> [B, L, C]."""
        shift, scale = (self.modulation + e[:, None]).unsqueeze(2).unbind(1)
        return self.final_proj(modulate(self.norm(x), shift, scale))


class AudioProjection(nn.Module):
    def __init__(self, audio_in_dim, dim):
        super().__init__()
        self.proj = nn.Linear(audio_in_dim, dim, bias=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, audio):
        return self.norm(self.proj(audio))


class VocalProjector(nn.Module):
    """wav2vec2 features -> audio tokens per latent frame (released 1.3B: 768 -> 1536, 2 blocks of 8 heads)."""

    def __init__(self, audio_in_dim=768, audio_proj_dim=1536, dit_dim=1536, ffn_dim=None, num_heads=8, num_layers=2,
                 expand_length=4, eps=1e-6):
        super().__init__()
        self.expand_length = expand_length
        self.proj_model = AudioProjection(audio_in_dim, audio_proj_dim)
        self.blocks = nn.ModuleList([VocalBlock(audio_proj_dim, dit_dim, ffn_dim or 2 * audio_proj_dim, num_heads, eps)
                                     for _ in range(num_layers)])
        self.final_head = VocalHead(audio_proj_dim, eps)

    def forward(self, audio, num_frames, latents, e0, e):
        """
        audio: [B, T, audio_in_dim] wav2vec2 last hidden state of the clip's audio.
        num_frames: video frames of the clip (4F - 3 for F latent frames).
        latents: [B, F*m, dit_dim] DiT tokens after patch embedding, m per latent frame.
        e0: [B, 6, dit_dim] DiT time projection; e: [B, dit_dim] DiT time embedding.
        Returns [B, F, n, audio_proj_dim].
        """
        ranges = audio_window_ranges(audio.shape[1], num_frames, self.expand_length)
        windows, _ = audio_windows(self.proj_model(audio), ranges)
        latent_frames = windows.shape[1]
        if latents.shape[1] % latent_frames:
            raise ValueError(f"{latents.shape[1]} DiT tokens do not split into {latent_frames} latent frames")
        x = windows.flatten(1, 2)
        for block in self.blocks:
            x = block(x, e0, latents, latent_frames)
        return self.final_head(x, e).unflatten(1, (latent_frames, -1))


def frame_block_mask(num_tokens, num_frames, tokens_per_frame, device=None):
    """[L, F*n] bool: video token l (frame-major, L/F per frame) sees only its frame's n audio tokens."""
    if num_tokens % num_frames:
        raise ValueError(f"{num_tokens} video tokens do not split into {num_frames} latent frames")
    video_frame = torch.arange(num_tokens, device=device) // (num_tokens // num_frames)
    audio_frame = torch.arange(num_frames * tokens_per_frame, device=device) // tokens_per_frame
    return video_frame[:, None] == audio_frame[None, :]
