"""Wan2.2 S2V-14B (speech to video): the Wan DiT with audio injectors, a reference-image frame, FramePack
motion tokens and optional pose latents.

Token sequence: [noisy latent (F*h*w) | reference latent (h*w) | motion tokens]. The reference frame
sits at RoPE time 30, the motion tokens at negative times (`s2v_framepack`); a learned embedding
(`trainable_cond_mask`) marks each segment (0 noisy, 1 reference, 2 motion). The noisy tokens are
modulated by the timestep t, reference and motion tokens by t = 0. Pose latents go through
`cond_encoder` and are added to the noisy tokens. After each block of `audio_inject_layers`, the video
tokens of every latent frame attend to that frame's audio tokens (`s2v_audio.AudioInjector`). Only the
noisy tokens reach the head.

Module names are the official `WanModel_S2V` ones; the blocks and embeddings are WanModel's (the
released key set is Wan2.1 T2V-14B's plus the S2V modules).
"""

import inspect

import torch
import torch.nn as nn

from .model import WanModel
from .rope import grid_positions, rope_cos_sin
from .s2v_audio import NUM_WAV2VEC_STATES, AudioInjector, CausalAudioEncoder
from .s2v_framepack import MOTION_LATENT_FRAMES, FramePackMotioner

REF_FRAME_TIME = 30     # RoPE time of the reference frame (hard-coded upstream)
MOTION_FRAMES = 73      # pixel frames of the motion buffer; the pipeline encodes them to 19 latents
S2V_14B_INJECT_LAYERS = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
NOISY, REFERENCE, MOTION = 0, 1, 2  # rows of `trainable_cond_mask`

# Config flags of the official class that the release fixes; other values select code paths the
# released checkpoint does not use (and this implementation does not have).
RELEASE_FLAGS = dict(enable_adain=True, adain_mode="attn_norm", enable_framepack=True, enable_motioner=False,
                     framepack_drop_mode="padd", zero_timestep=True, add_last_motion=True, enable_tsm=False)


class WanS2VModel(WanModel):
    def __init__(self, patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=5120, ffn_dim=13824, freq_dim=256,
                 text_dim=4096, out_dim=16, num_heads=40, num_layers=40, window_size=(-1, -1), qk_norm=True,
                 cross_attn_norm=True, eps=1e-6, cond_dim=16, audio_dim=1024, num_audio_token=4,
                 audio_inject_layers=S2V_14B_INJECT_LAYERS, model_type="s2v", **release_flags):
        """Arguments are the official `WanModel_S2V` config names (defaults: the 14B release).
        `release_flags` takes the official switches of `RELEASE_FLAGS` and accepts only the released values."""
        unknown = set(release_flags) - set(RELEASE_FLAGS)
        if unknown:
            raise TypeError(f"unexpected S2V arguments: {sorted(unknown)}")
        for name, value in release_flags.items():
            if value != RELEASE_FLAGS[name]:
                raise ValueError(f"S2V {name}={value!r} is not supported: only the released configuration "
                                 f"{name}={RELEASE_FLAGS[name]!r} is implemented")
        if model_type != "s2v":
            raise ValueError(f"WanS2VModel needs model_type 's2v', got '{model_type}'")
        bad = [i for i in audio_inject_layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"audio_inject_layers {bad} are outside the {num_layers} blocks")
        super().__init__("t2v", patch_size, text_len, in_dim, dim, ffn_dim, freq_dim, text_dim, out_dim, num_heads,
                         num_layers, window_size, qk_norm, cross_attn_norm, eps)
        self.model_type = "s2v"
        self.cond_encoder = nn.Conv3d(cond_dim, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.casual_audio_encoder = CausalAudioEncoder(audio_dim, dim, num_audio_token, NUM_WAV2VEC_STATES)
        self.audio_injector = AudioInjector(dim, num_heads, tuple(audio_inject_layers), eps)
        self.trainable_cond_mask = nn.Embedding(3, dim)
        self.frame_packer = FramePackMotioner(dim, latent_dim=in_dim)

    @classmethod
    def from_config(cls, config):
        """Builds from an official S2V `config.json` dict; keys that do not change the architecture
        (`zero_init`, `trainable_token_pos_emb`, `motion_token_num`, diffusers bookkeeping) are ignored."""
        accepted = (set(inspect.signature(cls.__init__).parameters) - {"self", "release_flags"}) | set(RELEASE_FLAGS)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in accepted})

    # -- S2V stages -----------------------------------------------------------------------------

    def encode_audio(self, audio, num_frames):
        """audio [B, 25, audio_dim, 4 * num_frames] wav2vec2 states of the clip at the video frame rate ->
        (global [B, F, C], tokens [B, F, num_audio_token + 1, C]). As upstream, the clip is prefixed with
        `MOTION_FRAMES` copies of its first frame and the outputs of that prefix are dropped, so the
        causal convolutions start from a steady state."""
        lead = audio[..., :1].expand(*audio.shape[:-1], MOTION_FRAMES)
        audio_global, tokens = self.casual_audio_encoder(torch.cat([lead, audio], dim=-1))
        lead_latents = (MOTION_FRAMES + 3) // 4
        audio_global, tokens = audio_global[:, lead_latents:], tokens[:, lead_latents:]
        if tokens.shape[1] != num_frames:
            raise ValueError(f"audio of {audio.shape[-1]} frames gives {tokens.shape[1]} latent frames of audio "
                             f"tokens, but the latent has {num_frames}; give 4 audio frames per latent frame")
        return audio_global, tokens

    def s2v_rope(self, grid, ref_grid, motion_positions, device):
        """(cos, sin) [L, 1, D/2] for noisy | reference | motion tokens."""
        key = ("s2v", grid, ref_grid, None if motion_positions is None else motion_positions.shape[0], str(device))
        if key not in self._rope_cache:
            parts = [grid_positions(*grid, device=device), grid_positions(*ref_grid, REF_FRAME_TIME, device=device)]
            if motion_positions is not None:
                parts.append(motion_positions.to(device))
            self._rope_cache[key] = rope_cos_sin(torch.cat(parts), self.head_dim)
        return self._rope_cache[key]

    def forward(self, x, t, context, *, ref_latents, audio, motion_latents=None, cond=None, drop_motion=False):
        """
        x: [B, 16, F, h, w] noisy latents of one clip.  t: [B] timesteps.
        context: [B, Lt, text_dim] text embeddings (or a list of [Lt_i, text_dim]).
        ref_latents: [B, 16, 1, h, w] reference image latent.
        audio: [B, 25, audio_dim, 4F] wav2vec2 hidden states of the clip at the video frame rate.
        motion_latents: [B, 16, T_m, h, w] latents of the motion buffer (the last 19 are used).
        cond: [B, cond_dim, F, h, w] pose latents; None = no pose (the official zeros).
        drop_motion: leave the motion tokens out (the first clip).
        Returns [B, 16, F, h, w] fp32.
        """
        if t.ndim != 1:
            raise ValueError(f"S2V takes one timestep per sample, t [B]; got {tuple(t.shape)}")
        tokens, grid = self.embed_tokens(x)
        cond_tokens = self.cond_encoder.bias.float() if cond is None else \
            self.cond_encoder(cond.to(self.dtype)).flatten(2).transpose(1, 2).float()
        tokens = tokens + cond_tokens
        ref_tokens, ref_grid = self.embed_tokens(ref_latents)
        if ref_grid[1:] != grid[1:] or ref_grid[0] != 1:
            raise ValueError(f"reference latent {tuple(ref_latents.shape)} must be one frame of the video latent's "
                             f"size {tuple(x.shape[3:])}")
        parts, motion_positions = [(tokens, NOISY), (ref_tokens, REFERENCE)], None
        if not drop_motion:
            if motion_latents is None:
                raise ValueError("motion_latents are required unless drop_motion=True (first clip)")
            motion_tokens, motion_positions = self.frame_packer(motion_latents)
            parts.append((motion_tokens, MOTION))
        segment = torch.cat([torch.full((p.shape[1],), kind, device=tokens.device) for p, kind in parts])
        num_noisy = tokens.shape[1]
        tokens = torch.cat([p for p, _ in parts], dim=1) + self.trainable_cond_mask.weight.float()[segment]
        rope = self.s2v_rope(grid, ref_grid, motion_positions, tokens.device)

        # Per-token modulation [B, L, 6, C] (noisy tokens: t, the rest: 0), as the blocks take it.
        e, e0 = self.embed_time(t, num_noisy)
        _, e0_clean = self.embed_time(torch.zeros_like(t), num_noisy)
        b, num_clean = tokens.shape[0], tokens.shape[1] - num_noisy
        e0 = torch.cat([e0.expand(b, num_noisy, *e0.shape[2:]), e0_clean.expand(b, num_clean, *e0.shape[2:])], dim=1)

        audio_global, audio_tokens = self.encode_audio(audio, grid[0])
        injected = self.audio_injector.block_to_injector

        def inject_audio(i, x):
            if i not in injected:
                return x
            noisy = self.audio_injector(i, x[:, :num_noisy], audio_global, audio_tokens)
            return torch.cat([noisy, x[:, num_noisy:]], dim=1)

        tokens = self.run_blocks(tokens, e0, rope, self.embed_context(context), after_block=inject_audio)
        return self.project_out(tokens[:, :num_noisy], e, grid)


def s2v_config(**overrides):
    """The released S2V-14B config (official `config.json` names), with `overrides`."""
    return dict(model_type="s2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=5120, ffn_dim=13824,
                freq_dim=256, text_dim=4096, out_dim=16, num_heads=40, num_layers=40, window_size=(-1, -1),
                qk_norm=True, cross_attn_norm=True, eps=1e-6, cond_dim=16, audio_dim=1024, num_audio_token=4,
                audio_inject_layers=S2V_14B_INJECT_LAYERS, **RELEASE_FLAGS) | overrides


__all__ = ["MOTION_FRAMES", "MOTION_LATENT_FRAMES", "WanS2VModel", "s2v_config"]
