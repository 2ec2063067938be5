"""The audio path of Wan2.2 S2V: wav2vec2 hidden states -> per-latent-frame audio tokens, and the
audio injectors that let the video tokens of each latent frame attend to that frame's tokens.

Key names are the official ones (`casual_audio_encoder.*`, `audio_injector.*`, the misspelling
included). All of this runs in fp32 whatever the parameter dtype, as the official code does under
`autocast(float32)`.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import CrossAttention, fp32_linear
from .text_context import CrossContext

NUM_WAV2VEC_STATES = 25  # input of layer 0 + 24 layer outputs of wav2vec2-large (a constructor default upstream)


class CausalConv1d(nn.Module):
    """Conv1d over time that sees only the past: left replicate-padding of kernel_size - 1 frames."""

    def __init__(self, in_dim, out_dim, kernel_size=3, stride=1):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(in_dim, out_dim, kernel_size, stride=stride)

    def forward(self, x):
        """x [B, C_in, T] -> [B, C_out, ceil(T / stride)] fp32."""
        x = F.pad(x.float(), (self.kernel_size - 1, 0), mode="replicate")
        return F.conv1d(x, self.conv.weight.float(), self.conv.bias.float(), stride=self.conv.stride)


class AudioFrameEncoder(nn.Module):
    """Audio features at the video frame rate -> `num_tokens` + 1 tokens per latent frame (local, for
    cross-attention) and one vector per latent frame (global, for the AdaLN of the injectors).

    Two stride-2 causal convolutions take T frames to ceil(ceil(T / 2) / 2). The local branch runs
    `num_tokens` groups of dim/4 channels through the same convolutions as the global branch
    (conv2/conv3 are shared), then a learned padding token is appended to each frame.
    """

    def __init__(self, in_dim, dim, num_tokens=4):
        super().__init__()
        if dim % 4:
            raise ValueError(f"S2V audio encoder width {dim} must be divisible by 4")
        self.num_tokens = num_tokens
        self.conv1_local = CausalConv1d(in_dim, dim // 4 * num_tokens)
        self.conv1_global = CausalConv1d(in_dim, dim // 4)
        self.conv2 = CausalConv1d(dim // 4, dim // 2, stride=2)
        self.conv3 = CausalConv1d(dim // 2, dim, stride=2)
        self.final_linear = nn.Linear(dim, dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, dim))

    @staticmethod
    def _norm_act(x):
        """[B, C, T] -> LayerNorm (no affine, eps 1e-6) over C, SiLU."""
        return F.silu(F.layer_norm(x.transpose(1, 2), (x.shape[1],), eps=1e-6)).transpose(1, 2)

    def _downsample(self, x):
        """[B, dim/4, T] after the first conv -> [B, T', dim] (T' = ceil(ceil(T/2)/2))."""
        x = self._norm_act(self.conv2(self._norm_act(x)))
        return self._norm_act(self.conv3(x)).transpose(1, 2)

    def forward(self, features):
        """features [B, T, in_dim] -> (global [B, T', dim], local tokens [B, T', num_tokens + 1, dim])."""
        b = features.shape[0]
        x = features.float().transpose(1, 2)
        local = self.conv1_local(x).unflatten(1, (self.num_tokens, -1)).flatten(0, 1)  # [B*N, dim/4, T]
        local = self._downsample(local).unflatten(0, (b, self.num_tokens)).transpose(1, 2)  # [B, T', N, dim]
        padding = self.padding_tokens.float().expand(b, local.shape[1], 1, -1)
        local = torch.cat([local, padding], dim=2)
        global_ = fp32_linear(self.final_linear, self._downsample(self.conv1_global(x)))
        return global_, local


class CausalAudioEncoder(nn.Module):
    """Weighted mean of the stacked wav2vec2 hidden states (learned weights w, mixed with SiLU(w) / sum
    SiLU(w)), then `AudioFrameEncoder`."""

    def __init__(self, audio_dim, dim, num_tokens=4, num_states=NUM_WAV2VEC_STATES):
        super().__init__()
        self.weights = nn.Parameter(torch.full((1, num_states, 1, 1), 0.01))
        self.encoder = AudioFrameEncoder(audio_dim, dim, num_tokens)

    def forward(self, audio):
        """audio [B, num_states, audio_dim, T] -> (global [B, T', dim], tokens [B, T', num_tokens + 1, dim])."""
        if audio.ndim != 4 or audio.shape[1] != self.weights.shape[1]:
            raise ValueError(f"S2V audio input must be [B, {self.weights.shape[1]} wav2vec2 hidden states, "
                             f"audio_dim, frames], got {tuple(audio.shape)}")
        weights = F.silu(self.weights.float())
        mixed = (audio.float() * weights / weights.sum(dim=1, keepdim=True)).sum(dim=1)  # [B, audio_dim, T]
        return self.encoder(mixed.transpose(1, 2))


class AdaLayerNorm(nn.Module):
    """LayerNorm (no affine, eps 1e-5) modulated by a conditioning vector: (shift, scale) =
    Linear(SiLU(cond)), shift first (diffusers' AdaLayerNorm with chunk_dim=1)."""

    def __init__(self, dim):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x, cond):
        """x [N, L, C], cond [N, C] -> [N, L, C] fp32."""
        shift, scale = fp32_linear(self.linear, F.silu(cond.float())).chunk(2, dim=-1)
        return F.layer_norm(x.float(), (x.shape[-1],), eps=1e-5) * (1 + scale[:, None]) + shift[:, None]


class AudioInjector(nn.Module):
    """One audio cross-attention (+ its AdaLN) per injected block, in the order of `inject_layers`."""

    def __init__(self, dim, num_heads, inject_layers, eps=1e-6):
        super().__init__()
        self.block_to_injector = {block: i for i, block in enumerate(inject_layers)}
        if len(self.block_to_injector) != len(inject_layers):
            raise ValueError(f"audio_inject_layers {list(inject_layers)} names a block twice")
        self.injector = nn.ModuleList([CrossAttention(dim, num_heads, qk_norm=True, eps=eps) for _ in inject_layers])
        self.injector_adain_layers = nn.ModuleList([AdaLayerNorm(dim) for _ in inject_layers])

    def forward(self, block, x, audio_global, audio_tokens):
        """Adds the audio residual of block `block` to the video tokens of each latent frame.

        x: [B, F * N, C] fp32 video tokens (N per latent frame).  audio_global: [B, F, C].
        audio_tokens: [B, F, K, C]. Returns [B, F * N, C].
        """
        i = self.block_to_injector[block]
        b, f = audio_tokens.shape[:2]
        frames = x.reshape(b * f, -1, x.shape[-1])
        query = self.injector_adain_layers[i](frames, audio_global.flatten(0, 1))
        attn = self.injector[i]
        dtype = attn.q.weight.dtype
        context = CrossContext(audio_tokens.flatten(0, 1).to(dtype))
        return x + attn(query.to(dtype), context).float().reshape(x.shape)
