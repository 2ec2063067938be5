"""The frozen encoders of diffusion training: raw samples (video in [-1, 1] + caption) -> the DiT's
inputs (normalized latents, umT5 context and, for image-to-video models, the image condition).
Used online by the trainer and once, offline, by scripts/cache_latents.py."""

import torch
from omegaconf import OmegaConf

from pipelines.conditioning import known_frame_mask
from wan.configs import get_preset
from wan.convert_vae import load_vae
from wan.modules.clip import CLIPImageEncoder
from wan.modules.text_encoder import T5TextEncoder

from .config import DTYPES


class Encoders:
    """VAE + umT5 (+ CLIP for Wan2.1 i2v/flf2v) of one model, loaded from `cfg.encoders` paths."""

    def __init__(self, cfg, dit, device):
        enc = cfg.encoders
        dtype = DTYPES[enc.dtype]
        self.model_type = dit["model_type"]
        self.device = device
        version = get_preset(cfg.model.preset).vae[len("wan"):] if cfg.model.preset else (
            "2.2" if dit.get("out_dim") == 48 else "2.1")
        self.vae = load_vae(enc.vae_checkpoint, version, dtype, device, **OmegaConf.to_container(enc.vae_config))
        self.t5 = T5TextEncoder.from_checkpoint(enc.t5_checkpoint, enc.t5_tokenizer, dit.get("text_len", 512), dtype,
                                                device, cache_size=0, **OmegaConf.to_container(enc.t5_config))
        self.clip = None
        if dit.get("image_branch", self.model_type in ("i2v", "flf2v")):
            self.clip = CLIPImageEncoder.from_checkpoint(enc.clip_checkpoint, dtype, device,
                                                         **OmegaConf.to_container(enc.clip_config))

    def modules(self):
        """The encoder networks whose weights may be sharded: umT5 and CLIP."""
        return [self.t5.model] + ([self.clip.model] if self.clip else [])

    @torch.no_grad()
    def __call__(self, batch):
        """{"video": [B, 3, T, H, W], "text": [B]} -> {"latents", "context", and "y"/"clip_fea" for i2v/flf2v}."""
        video = batch["video"].to(self.device)
        out = {"latents": self.vae.encode(video).float(), "context": self.t5.encode(batch["text"], self.device)}
        if self.model_type in ("i2v", "flf2v"):
            out["y"] = self.image_condition(video, keep_last=self.model_type == "flf2v")
        if self.clip is not None:
            frames = [0, -1] if self.model_type == "flf2v" else [0]
            out["clip_fea"] = self.clip.encode(list(video[:, :, frames])).float()
        return out

    def image_condition(self, video, keep_last):
        """y = [mask, VAE(given frames, zeros elsewhere)]: [B, 4 + z_dim, F_lat, h, w]."""
        given = torch.zeros_like(video)
        given[:, :, 0] = video[:, :, 0]
        if keep_last:
            given[:, :, -1] = video[:, :, -1]
        latents = self.vae.encode(given).float()
        mask = known_frame_mask(video.shape[2], *latents.shape[-2:], self.vae.temporal_stride, keep_last)
        return torch.cat([mask.to(latents)[None].expand(len(video), -1, -1, -1, -1), latents], dim=1)
