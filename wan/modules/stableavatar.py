"""StableAvatar (Francis-Rings/StableAvatar): Wan2.1 i2v DiT (1.3B) + an audio cross-attention branch.

Every block's cross-attention gets a `vocal` branch (`k_vocal`, `v_vocal`, no key norm, no RoPE)
that shares the text/image query: video tokens of latent frame f attend to frame f's audio tokens
only (a block-diagonal mask over [B, F*n] audio tokens), and the result is added before `o`. The
audio tokens come from the `VocalProjector` (wav2vec2 features, modulated by the DiT's own time
embeddings and attending to the DiT tokens after patch embedding). Key names are the released
checkpoint's: the official Wan i2v names plus `blocks.N.cross_attn.{k,v}_vocal.*` and
`vocal_projector.*` (160 keys over Wan2.1-Fun-1.3B-InP).
"""

import inspect

import torch
import torch.nn as nn

from .model import WanModel
from .vocal_projector import VocalProjector, frame_block_mask

# The released transformer3d-square.pt / transformer3d-rec-vec.pt (Wan2.1-Fun-1.3B-InP + the adapter).
STABLEAVATAR_1_3B = dict(model_type="i2v", in_dim=36, dim=1536, ffn_dim=8960, freq_dim=256, text_dim=4096, out_dim=16,
                         num_heads=12, num_layers=30, text_len=512)


class StableAvatarModel(WanModel):
    def __init__(self, vocal_projector=None, **kwargs):
        """WanModel's arguments (always i2v) plus `vocal_projector`: the `VocalProjector` arguments
        (default the released 768 -> dim projector); its width must equal the DiT width."""
        kwargs = {**kwargs, "model_type": kwargs.get("model_type", "i2v")}
        if kwargs["model_type"] != "i2v":
            raise ValueError(f"StableAvatar is an i2v model, got model_type '{kwargs['model_type']}'")
        super().__init__(**kwargs)
        projector = {"audio_in_dim": 768, "audio_proj_dim": self.dim, "dit_dim": self.dim, **(vocal_projector or {})}
        if projector["audio_proj_dim"] != self.dim or projector["dit_dim"] != self.dim:
            raise ValueError(f"the vocal projector's widths ({projector['audio_proj_dim']}, {projector['dit_dim']}) "
                             f"must equal the DiT width {self.dim}: its tokens feed k_vocal/v_vocal")
        for block in self.blocks:
            block.cross_attn.add_branch("vocal", key_norm=False)
            for layer in (block.cross_attn.k_vocal, block.cross_attn.v_vocal):
                nn.init.zeros_(layer.weight)  # a fresh adapter leaves the base model's output unchanged
                nn.init.zeros_(layer.bias)
        self.vocal_projector = VocalProjector(**projector)
        self.audio_in_dim = projector["audio_in_dim"]

    @classmethod
    def from_config(cls, config):
        accepted = set(inspect.signature(WanModel.__init__).parameters) | {"vocal_projector"}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in accepted})

    def vocal_tokens(self, audio, num_frames, tokens, e0, e):
        """Projector output [B, F, n, C] for audio [B, T, audio_in_dim], DiT tokens [B, L, C] and the
        DiT's time embeddings e0 [B, 6, C] and e [B, C]."""
        dtype = self.dtype
        return self.vocal_projector(audio.to(dtype), num_frames, tokens.to(dtype), e0.to(dtype), e.to(dtype))

    def forward(self, x, t, context, *, y, clip_fea, audio, audio_mask=None, num_frames=None, seq_len=None,
                clip_level=False):
        """
        x: [B, 16, F, H, W] noisy latents; y: [B, 20, F, H, W] i2v condition; t: [B] timesteps.
        context: text embeddings [B, Lt, text_dim] or a list; clip_fea: [B, 257, clip_dim].
        audio: [B, T, audio_in_dim] wav2vec2 last hidden state of each row's clip audio.
        audio_mask: [B] bool; rows that are False get zero audio tokens (the "no audio" guidance
            branch of the released pipeline). Default: every row has audio.
        num_frames: video frames the audio windows are cut for; default 4F - 3 (F latent frames).
        seq_len: reproduce the released pipeline's shorter last window: tokens zero-padded to
            seq_len (a whole clip), the padding unmasked in attention and grouped as extra frames.
        clip_level: every video token attends every audio token (training's clip-level modelling).
        Returns [B, 16, F, H, W] fp32.
        """
        tokens, grid = self.embed_tokens(torch.cat([x, y.to(x.dtype)], dim=1))
        if seq_len is not None:
            if seq_len < tokens.shape[1]:
                raise ValueError(f"seq_len {seq_len} is shorter than the {tokens.shape[1]} video tokens")
            tokens = torch.nn.functional.pad(tokens, (0, 0, 0, seq_len - tokens.shape[1]))
        num_frames = num_frames or 4 * grid[0] - 3
        e, e0 = self.embed_time(t, tokens.shape[1])
        audio_mask = torch.ones(x.shape[0], dtype=torch.bool) if audio_mask is None else audio_mask
        audio_mask = audio_mask.to(x.device)
        projected = self.vocal_tokens(audio[audio_mask], num_frames, tokens[audio_mask], e0[audio_mask, 0],
                                      e[audio_mask, 0])
        vocal = projected.new_zeros(x.shape[0], *projected.shape[1:]).index_put((audio_mask,), projected)
        latent_frames, per_frame = vocal.shape[1:3]
        mask = None if clip_level else frame_block_mask(tokens.shape[1], latent_frames, per_frame, tokens.device)
        context = self.embed_context(context, clip_fea)
        context.branches["vocal"] = (vocal.flatten(1, 2), mask)
        tokens = self.run_blocks(tokens, e0, self.rope(grid, tokens.device), context)
        return self.project_out(tokens, e, grid)
