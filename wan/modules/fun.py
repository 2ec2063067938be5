"""VideoX-Fun's Wan variants (Fun InP / Control / Control-Camera, Wan2.1 and Wan2.2) as one WanModel
with optional inputs, keeping the official key names plus two optional modules:

- InP and Control differ from the official model only in their input channels: the condition `y`
  (InP: 4 mask + 16 masked-video latents; Control: 16 control-video latents + 16 start-image
  latents; Wan2.2 Control: control + mask + masked latents) is concatenated to the noisy latent.
- `ref_conv` (V1.1 Control, Wan2.2 Control): the reference image latent [B, 16, h, w] becomes
  h/2 * w/2 tokens prepended to the video tokens. RoPE places them at frame 0 and shifts the video
  to frames 1..F; the head drops them.
- `control_adapter` (Control-Camera): Plücker rays [B, 24, F, H_pix, W_pix] (see `wan.camera`)
  through `CameraAdapter`, added to the patch-embedded video tokens.

All Wan2.1-Fun models keep the CLIP image branch (model_type "i2v"); the Wan2.2-Fun experts have
none (`image_branch=False`).
"""

import inspect

import torch
import torch.nn as nn

from .camera_adapter import CameraAdapter
from .model import WanModel


class FunWanModel(WanModel):
    def __init__(self, *args, add_ref_conv=False, ref_dim=16, add_control_adapter=False, in_dim_control_adapter=24,
                 downscale_factor_control_adapter=8, **kwargs):
        """WanModel's arguments plus VideoX-Fun's: `add_ref_conv` (reference-image tokens from a
        `ref_dim`-channel latent) and `add_control_adapter` (camera adapter over
        `in_dim_control_adapter` channels, pixel-unshuffled by `downscale_factor_control_adapter`)."""
        super().__init__(*args, **kwargs)
        spatial_patch = self.patch_size[1:]
        if add_ref_conv:
            self.ref_conv = nn.Conv2d(ref_dim, self.dim, kernel_size=spatial_patch, stride=spatial_patch)
        if add_control_adapter:
            self.control_adapter = CameraAdapter(in_dim_control_adapter, self.dim, spatial_patch,
                                                 downscale_factor_control_adapter)

    @classmethod
    def from_config(cls, config):
        """Builds from a config dict (VideoX-Fun's `config.json` keys included), ignoring foreign keys."""
        accepted = {*inspect.signature(WanModel.__init__).parameters, *inspect.signature(cls.__init__).parameters}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in accepted})

    @property
    def has_ref_conv(self):
        return hasattr(self, "ref_conv")

    @property
    def has_control_adapter(self):
        return hasattr(self, "control_adapter")

    def embed_reference(self, full_ref):
        """full_ref [B, ref_dim, h, w] latent -> reference tokens [B, h/2 * w/2, C] fp32."""
        if not self.has_ref_conv:
            raise ValueError("a reference image (full_ref) was given, but this model has no ref_conv; "
                             "use a V1.1 / Wan2.2 Control checkpoint or drop the reference image")
        return self.ref_conv(full_ref.to(self.dtype)).flatten(2).transpose(1, 2).float()

    def forward(self, x, t, context, *, y=None, clip_fea=None, full_ref=None, y_camera=None):
        """
        x: [B, 16, F, H, W] noisy latents.  t: [B] or [B, L] per-token timesteps (5B).
        context: [B, Lt, text_dim] or a list of [Lt_i, text_dim].  y: [B, Cy, F, H, W] condition.
        clip_fea: [B, 257, 1280] (Wan2.1-Fun).  full_ref: [B, 16, H, W] reference latent (ref_conv
        models; required by them, zeros meaning "no reference" as the reference pipelines feed).
        y_camera: [B, 24, F, 8H, 8W] grouped Plücker rays (camera models).
        Returns [B, out_dim, F, H, W] fp32.
        """
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        tokens, grid = self.embed_tokens(x)
        if self.has_control_adapter:
            if y_camera is None:
                raise ValueError("this Control-Camera model needs the camera rays `y_camera` [B, 24, F, H*8, W*8]")
            tokens = tokens + self.control_adapter(y_camera.to(self.dtype)).flatten(2).transpose(1, 2).float()
        elif y_camera is not None:
            raise ValueError("y_camera given, but this model has no control_adapter (not a Control-Camera model)")
        num_ref = 0
        if full_ref is not None or self.has_ref_conv:
            if full_ref is None:
                raise ValueError("this ref_conv model needs `full_ref` [B, 16, H, W] (zeros when there is no "
                                 "reference image)")
            ref = self.embed_reference(full_ref)
            num_ref = ref.shape[1]
            if num_ref != grid[1] * grid[2]:
                raise ValueError(f"reference latent {tuple(full_ref.shape[2:])} does not match the video latent's "
                                 f"{tuple(x.shape[3:])}; encode the reference image at the video size")
            tokens = torch.cat([ref, tokens], dim=1)
            if t.ndim == 2:  # per-token timesteps: the reference tokens take the last token's
                t = torch.cat([t[:, -1:].expand(-1, num_ref), t], dim=1)
        # Reference tokens form frame 0 of the RoPE grid: they have one frame's worth of tokens.
        rope_grid = (grid[0] + 1, *grid[1:]) if num_ref else grid
        e, e0 = self.embed_time(t, tokens.shape[1])
        context = self.embed_context(context, clip_fea)
        tokens = self.run_blocks(tokens, e0, self.rope(rope_grid, tokens.device), context)
        if num_ref:
            tokens = tokens[:, num_ref:]
            e = e[:, num_ref:] if e.shape[1] > 1 else e
        return self.project_out(tokens, e, grid)
