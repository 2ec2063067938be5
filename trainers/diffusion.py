"""Flow-matching (rectified flow) fine-tuning of a Wan DiT, full or LoRA.

Wan's convention: x_t = (1 - sigma) * x0 + sigma * noise, the model predicts v = noise - x0 at
timestep t = 1000 * sigma. Sigmas are drawn uniformly or logit-normally, restricted to
`diffusion.timestep_range`, then shifted: sigma' = shift * sigma / (1 + (shift - 1) * sigma).
Conditioning: t2v text only; i2v/flf2v the `y` channels (+ CLIP tokens); ti2v keeps the first
latent frame clean (timestep 0 on its tokens, no loss there). With `frames_per_block`, every
block of latent frames gets its own timestep (diffusion forcing).
"""

import json
import math

import torch

from wan.checkpoint import save_state_dict
from wan.lora import init_lora_A, inject_lora, lora_file_state, lora_modules
from wan.model_loading import load_dit
from wan.modules.model import WanModel
from wan.samplers.schedule import shift_sigma

from . import register_trainer
from .config import DTYPES, dit_config
from .encoders import Encoders

SAMPLINGS = ("uniform", "logit_normal")


def unshift_sigma(sigma, shift):
    """Inverse of `shift_sigma`."""
    return sigma / (shift - (shift - 1) * sigma)


@register_trainer("diffusion")
class DiffusionTrainer:
    @classmethod
    def config_problems(cls, cfg):
        if cfg.data.kind == "prompts":
            yield "the diffusion trainer needs videos: set data.kind to videos, json or latents"
        if cfg.data.kind in ("videos", "json"):
            for key in ("vae_checkpoint", "t5_checkpoint", "t5_tokenizer"):
                if cfg.encoders[key] is None:
                    yield f"data.kind {cfg.data.kind} encodes raw video online: set encoders.{key} (or cache latents)"
        d = cfg.diffusion
        if d.timestep_sampling not in SAMPLINGS:
            yield f"diffusion.timestep_sampling must be one of {SAMPLINGS}, got '{d.timestep_sampling}'"
        lo, hi = d.timestep_range
        if not 0 <= lo < hi <= 1000:
            yield f"diffusion.timestep_range must satisfy 0 <= low < high <= 1000, got {list(d.timestep_range)}"
        if d.frames_per_block is not None and d.frames_per_block < 1:
            yield f"diffusion.frames_per_block must be >= 1 or null, got {d.frames_per_block}"

    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, device
        self.dit = dit_config(cfg.model)
        self.lora = cfg.lora.enabled
        with torch.device("meta"):
            self.model = WanModel.from_config(self.dit)
        if self.lora:
            self.model.to(DTYPES[cfg.model.frozen_dtype])
            inject_lora(self.model, cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.init)
        self.encoders = Encoders(cfg, self.dit, device) if cfg.data.kind in ("videos", "json") else None

    # -- the loop's interface ---------------------------------------------------------------------

    def initial_state(self):
        """The starting weights (full state dict of `model`): the checkpoint or a seeded random init,
        plus freshly initialized LoRA weights."""
        if self.cfg.model.checkpoint:
            dtype = DTYPES[self.cfg.model.frozen_dtype] if self.lora else torch.float32
            model = load_dit(self.cfg.model.checkpoint, config=self.dit, dtype=dtype)
        else:
            model = WanModel.from_config(self.dit)
        state = model.state_dict()
        for name, module in lora_modules(self.model).items():
            state[f"{name}.lora_A.weight"] = torch.empty(module.rank, module.in_features)
            init_lora_A(state[f"{name}.lora_A.weight"], self.cfg.lora.init)
            state[f"{name}.lora_B.weight"] = torch.zeros(module.out_features, module.rank)
        return state

    def frozen_modules(self):
        return self.encoders.modules() if self.encoders else []

    def export(self, state, folder, suffix=""):
        """Writes the gathered trainable weights for inference: `model{suffix}.safetensors` beside a
        `config.json` (load_dit reads it), or `lora{suffix}.safetensors` in the ComfyUI/diffusers format."""
        dtype = DTYPES[self.cfg.checkpoint.export_dtype]
        state = {k: v.to(dtype) for k, v in state.items()}
        if self.lora:
            alphas = {name: m.alpha for name, m in lora_modules(self.model).items()}
            save_state_dict(lora_file_state(state, alphas), folder / f"lora{suffix}.safetensors")
        else:
            save_state_dict(state, folder / f"model{suffix}.safetensors")
            (folder / "config.json").write_text(json.dumps(self.dit, indent=2))

    def loss(self, batch, generator):
        inputs = self.encoders(batch) if self.encoders else batch
        x0 = inputs["latents"].to(self.device, torch.float32)
        noise = torch.randn(x0.shape, generator=generator, device=self.device)
        sigma = self.frame_sigmas(x0.shape[0], x0.shape[2], generator)  # [B, F]
        s = sigma[:, None, :, None, None]
        xt = (1 - s) * x0 + s * noise
        conditions = {k: inputs[k].to(self.device) for k in ("y", "clip_fea") if k in inputs}
        context = [c.to(self.device) for c in inputs["context"]]
        tokens_per_frame = math.prod(x0.shape[3:]) // math.prod(self.model.patch_size[1:])
        if bool((sigma == sigma[:, :1]).all()):
            t = sigma[:, 0] * 1000
        else:  # per-token timesteps
            t = (sigma * 1000).repeat_interleave(tokens_per_frame, dim=1)
        pred = self.model(xt, t, context, **conditions)
        error = (pred.float() - (noise - x0)).square().mean(dim=(1, 3, 4))  # [B, F]
        weight = (sigma > 0).float()  # frames given clean (ti2v's first frame) carry no loss
        loss = (error * weight).sum() / weight.sum()
        return loss, {"tokens": x0.shape[0] * x0.shape[2] * tokens_per_frame}

    # -- timesteps --------------------------------------------------------------------------------

    def sample_sigmas(self, shape, generator):
        """Shifted sigmas of `shape`, distributed as `timestep_sampling` within `timestep_range`."""
        d = self.cfg.diffusion
        lo, hi = (unshift_sigma(torch.tensor(t / 1000, dtype=torch.float64), d.shift) for t in d.timestep_range)
        p = torch.rand(shape, generator=generator, device=self.device, dtype=torch.float64)
        if d.timestep_sampling == "uniform":
            u = lo + (hi - lo) * p
        else:  # logit-normal through its inverse CDF, so the range restriction stays exact
            cdf = lambda x: torch.special.ndtr(torch.logit(x.clamp(1e-12, 1 - 1e-12)))  # noqa: E731
            u = torch.sigmoid(torch.special.ndtri(cdf(lo) + (cdf(hi) - cdf(lo)) * p))
        return shift_sigma(u, d.shift).float()

    def frame_sigmas(self, batch_size, num_frames, generator):
        """[B, F] sigma of each latent frame: one per sample, or one per block of `frames_per_block`."""
        block = self.cfg.diffusion.frames_per_block or num_frames
        sigma = self.sample_sigmas((batch_size, -(-num_frames // block)), generator)
        sigma = sigma.repeat_interleave(block, dim=1)[:, :num_frames]
        if self.dit["model_type"] == "ti2v":
            sigma[:, 0] = 0
        return sigma

