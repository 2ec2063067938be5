"""VideoX-Fun training modes on the diffusion trainer: the condition channels `y` of a Fun model are
built online from each sample (data.kind videos or json; control needs json entries with
`control_file_path`, aspect buckets as for every video dataset).

- `normal`: text to video; a model with condition channels gets y = 0 (and zero CLIP features).
- `inpaint` (InP, 4 + 16 channels): a random mask per sample (1 = to generate), one of the patterns
  of `INPAINT_PATTERNS`; y = [4 mask channels, 1 = known, latents of the video with masked pixels
  zeroed]. A fully masked sample gets y = 0 with probability `full_mask_zero_prob`; CLIP sees the
  first frame, zeroed with probability `condition_dropout`.
- `control` (16 control channels, then any further channels zero): the control video's latents,
  zeroed with probability `condition_dropout`.
The loss is the diffusion trainer's (flow matching, target noise - x0).
"""

from pathlib import Path

import torch
import torch.nn.functional as F

from . import register_trainer
from .diffusion import DiffusionTrainer

FUN_DEFAULTS = Path(__file__).resolve().parents[1] / "configs" / "fun_train_defaults.yaml"
TRAIN_MODES = ("normal", "inpaint", "control")
INPAINT_PATTERNS = ("first_frame", "first_and_last_frame", "box", "continuation", "all")


def inpaint_mask(pattern, frames, height, width, generator):
    """[1, frames, height, width] float mask of a pattern, 1 = to generate."""
    mask = torch.ones(1, frames, height, width, device=generator.device)
    if pattern == "first_frame":
        mask[:, 0] = 0
    elif pattern == "first_and_last_frame":
        mask[:, [0, -1]] = 0
    elif pattern == "continuation":  # the first k frames given
        k = int(torch.randint(1, max(frames, 2), (1,), generator=generator, device=generator.device))
        mask[:, :k] = 0
    elif pattern == "box":  # a random box to fill in, on every frame
        mask.zero_()
        h = int(torch.randint(height // 4, height // 2 + 1, (1,), generator=generator, device=generator.device))
        w = int(torch.randint(width // 4, width // 2 + 1, (1,), generator=generator, device=generator.device))
        top = int(torch.randint(0, height - h + 1, (1,), generator=generator, device=generator.device))
        left = int(torch.randint(0, width - w + 1, (1,), generator=generator, device=generator.device))
        mask[:, :, top:top + h, left:left + w] = 1
    elif pattern != "all":
        raise ValueError(f"unknown inpaint pattern '{pattern}'; expected one of {INPAINT_PATTERNS}")
    return mask


def mask_channels(mask, lat_h, lat_w, temporal_stride=4):
    """Pixel mask [B, 1, F, H, W] (1 = to generate) -> [B, 4, F_lat, lat_h, lat_w] (1 = known): the first
    frame repeated 4 times, 4 pixel frames per latent frame, resized to the latent grid."""
    known = 1 - mask[:, 0]
    known = torch.cat([known[:, :1].repeat_interleave(temporal_stride, dim=1), known[:, 1:]], dim=1)
    b, f, h, w = known.shape
    grouped = known.reshape(b, f // temporal_stride, temporal_stride, h, w).transpose(1, 2)
    return F.interpolate(grouped, size=(f // temporal_stride, lat_h, lat_w), mode="trilinear", align_corners=False)


@register_trainer("fun")
class FunTrainer(DiffusionTrainer):
    defaults = FUN_DEFAULTS

    @classmethod
    def config_problems(cls, cfg):
        yield from super().config_problems(cfg)
        mode = cfg.fun.train_mode
        if mode not in TRAIN_MODES:
            yield f"fun.train_mode must be one of {TRAIN_MODES}, got '{mode}'"
        if cfg.data.kind not in ("videos", "json"):
            yield "the fun trainer builds its conditions from raw video: set data.kind to videos or json"
        if mode == "control" and cfg.data.kind != "json":
            yield "fun.train_mode control reads control videos: set data.kind json with control_file_path entries"
        if cfg.causal.enabled:
            yield "the fun trainer trains the bidirectional model: set causal.enabled false"

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        self.mode = cfg.fun.train_mode
        self.condition_channels = self.dit.get("in_dim", 16) - self.dit.get("out_dim", 16)
        needed = {"inpaint": 4 + 16, "control": 16}.get(self.mode, 0)
        if self.condition_channels < needed:
            raise ValueError(f"fun.train_mode {self.mode} needs a model with at least {needed} condition channels "
                             f"(in_dim - out_dim), this one has {self.condition_channels}")

    def _chance(self, p, generator, batch):
        """[B] floats: 0 with probability p, else 1."""
        return (torch.rand(batch, generator=generator, device=generator.device) >= p).float().to(self.device)

    def encode(self, batch, generator):
        enc, fun = self.encoders, self.cfg.fun
        video = batch["video"].to(self.device)
        b = video.shape[0]
        out = {"latents": enc.vae.encode(video).float(), "context": enc.t5.encode(batch["text"], self.device)}
        lat_h, lat_w = out["latents"].shape[-2:]
        frames = out["latents"].shape[2]
        y = torch.zeros(b, self.condition_channels, frames, lat_h, lat_w, device=self.device)
        keep_clip = torch.zeros(b, device=self.device)
        if self.mode == "inpaint":
            patterns = torch.randint(len(INPAINT_PATTERNS), (b,), generator=generator, device=generator.device)
            mask = torch.stack([inpaint_mask(INPAINT_PATTERNS[int(p)], *video.shape[2:], generator)
                                for p in patterns]).to(self.device)
            masked = enc.vae.encode(video * (1 - mask)).float()
            fully_masked = (mask.flatten(1).amin(1) == 1).float()
            keep = 1 - fully_masked * (1 - self._chance(fun.full_mask_zero_prob, generator, b))
            y[:, :4 + masked.shape[1]] = torch.cat([mask_channels(mask, lat_h, lat_w, enc.vae.temporal_stride),
                                                    masked], 1) * keep[:, None, None, None, None]
            keep_clip = self._chance(fun.condition_dropout, generator, b)
        elif self.mode == "control":
            control = enc.vae.encode(batch["control_video"].to(self.device)).float()
            keep = self._chance(fun.condition_dropout, generator, b)
            y[:, :control.shape[1]] = control * keep[:, None, None, None, None]
        if self.condition_channels:
            out["y"] = y
        if enc.clip is not None:
            out["clip_fea"] = enc.clip.encode(list(video[:, :, [0]])).float() * keep_clip[:, None, None]
        return out
