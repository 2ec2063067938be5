"""Flow-matching (rectified flow) fine-tuning of a Wan DiT, full or LoRA.

Wan's convention: x_t = (1 - sigma) * x0 + sigma * noise, the model predicts v = noise - x0 at
timestep t = 1000 * sigma. Sigmas are drawn uniformly or logit-normally, restricted to
`diffusion.timestep_range`, then shifted: sigma' = shift * sigma / (1 + (shift - 1) * sigma).
Conditioning: t2v text only; i2v/flf2v the `y` channels (+ CLIP tokens); ti2v keeps the first
latent frame clean (timestep 0 on its tokens, no loss there).

Causal (`causal.enabled`): the block-causal model, every block of latent frames with its own
timestep (diffusion forcing); with `teacher_forcing`, the noisy blocks attend to the clean earlier
blocks instead of their noisy versions (CausVid).
"""

import json
import math

import torch

from wan.checkpoint import save_state_dict
from wan.lora import init_lora_A, inject_lora, lora_modules, save_lora
from wan.model_loading import load_dit
from wan.modules.causal_model import CausalWanModel
from wan.modules.model import WanModel
from wan.samplers.schedule import shift_sigma

from . import register_trainer
from .config import DTYPES, dit_config
from .encoders import Encoders

SAMPLINGS = ("uniform", "logit_normal")


def unshift_sigma(sigma, shift):
    """Inverse of `shift_sigma`."""
    return sigma / (shift - (shift - 1) * sigma)


def teacher_forcing_mask(block_sizes, tokens_per_frame, device=None):
    """[2L, 2L] bool attention mask over [noisy | clean] tokens: a noisy block sees itself and the
    clean blocks before it, a clean block the clean blocks up to itself."""
    block = torch.arange(len(block_sizes), device=device).repeat_interleave(torch.tensor(block_sizes, device=device))
    query, key = block[:, None], block[None, :]
    mask = torch.cat([torch.cat([query == key, key < query], 1),
                      torch.cat([torch.zeros_like(query == key), key <= query], 1)])
    return mask.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


class TeacherForcedCausalWan(CausalWanModel):
    """The causal model with a training forward that can take the clean video as context.

    forward(x, t [B, F], context, clip_fea, clean=None): without `clean`, the block-causal forward;
    with it, the clean tokens (timestep 0, same positions) are appended and the noisy blocks attend
    to them through `teacher_forcing_mask`.
    """

    def forward(self, x, t, context, clip_fea=None, clean=None):
        if clean is None:
            return super().forward(x, t, context, clip_fea)
        model = self.model
        noisy, grid = model.embed_tokens(x)
        clean, _ = model.embed_tokens(clean)
        e, e0 = self.embed_time(t, grid)
        e0_clean = self.embed_time(torch.zeros_like(t), grid)[1]
        cos, sin = model.rope(grid, noisy.device)
        mask = teacher_forcing_mask(self.block_sizes(grid[0]), grid[1] * grid[2], noisy.device)
        tokens = model.run_blocks(torch.cat([noisy, clean], 1), torch.cat([e0, e0_clean], 1),
                                  (torch.cat([cos, cos]), torch.cat([sin, sin])),
                                  model.embed_context(context, clip_fea), mask)
        return model.project_out(tokens[:, :noisy.shape[1]], e, grid)


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
        if cfg.causal.enabled and cfg.causal.num_frame_per_block < 1:
            yield f"causal.num_frame_per_block must be >= 1, got {cfg.causal.num_frame_per_block}"

    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, device
        self.dit = dit_config(cfg.model)
        self.lora = cfg.lora.enabled
        with torch.device("meta"):
            self.dit_model = WanModel.from_config(self.dit)
        if self.lora:
            self.dit_model.to(DTYPES[cfg.model.frozen_dtype])
            inject_lora(self.dit_model, cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout,
                        cfg.lora.init)
        self.causal = cfg.causal.enabled
        # the trainable module; the causal wrapper holds the WanModel's weights under `model.`
        self.model = TeacherForcedCausalWan(self.dit_model, cfg.causal.num_frame_per_block,
                                            independent_first_frame=cfg.causal.independent_first_frame
                                            ) if self.causal else self.dit_model
        self.prefix = "model." if self.causal else ""
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
        for name, module in lora_modules(self.dit_model).items():
            state[f"{name}.lora_A.weight"] = torch.empty(module.rank, module.in_features)
            init_lora_A(state[f"{name}.lora_A.weight"], self.cfg.lora.init)
            state[f"{name}.lora_B.weight"] = torch.zeros(module.out_features, module.rank)
        return {self.prefix + k: v for k, v in state.items()}

    def frozen_modules(self):
        return self.encoders.modules() if self.encoders else []

    def export(self, state, folder, suffix=""):
        """Writes the gathered trainable weights for inference: `model{suffix}.safetensors` beside a
        `config.json` (load_dit reads it), or `lora{suffix}.safetensors` in the ComfyUI/diffusers format."""
        dtype = DTYPES[self.cfg.checkpoint.export_dtype]
        state = {k[len(self.prefix):]: v.to(dtype) for k, v in state.items()}
        if self.lora:
            save_lora(self.dit_model, folder / f"lora{suffix}.safetensors", tensors=state)
        else:
            save_state_dict(state, folder / f"model{suffix}.safetensors")
            (folder / "config.json").write_text(json.dumps(self.dit, indent=2))

    def encode(self, batch, generator):
        """A micro-batch -> the DiT's inputs (latents, context, and y / clip_fea where the model takes them)."""
        return self.encoders(batch) if self.encoders else batch

    def loss(self, batch, generator):
        inputs = self.encode(batch, generator)
        x0 = inputs["latents"].to(self.device, torch.float32)
        noise = torch.randn(x0.shape, generator=generator, device=self.device)
        sigma = self.frame_sigmas(x0.shape[0], x0.shape[2], generator)  # [B, F]
        s = sigma[:, None, :, None, None]
        xt = (1 - s) * x0 + s * noise
        y = inputs["y"].to(self.device) if "y" in inputs else None
        with_y = (lambda x: torch.cat([x, y.to(x.dtype)], dim=1)) if y is not None else (lambda x: x)
        clip_fea = inputs["clip_fea"].to(self.device) if "clip_fea" in inputs else None
        context = [c.to(self.device) for c in inputs["context"]]
        tokens_per_frame = math.prod(x0.shape[3:]) // math.prod(self.dit_model.patch_size[1:])
        if self.causal:  # per-frame timesteps
            clean = with_y(x0) if self.cfg.causal.teacher_forcing else None
            pred = self.model(with_y(xt), sigma * 1000, context, clip_fea, clean=clean)
        else:
            uniform = bool((sigma == sigma[:, :1]).all())
            t = sigma[:, 0] * 1000 if uniform else (sigma * 1000).repeat_interleave(tokens_per_frame, dim=1)
            pred = self.model(with_y(xt), t, context, clip_fea=clip_fea, **self.model_inputs(inputs, generator))
        error = (pred.float() - (noise - x0)).square().mean(dim=(1, 3, 4))  # [B, F]
        weight = (sigma > 0).float()  # frames given clean (ti2v's first frame) carry no loss
        loss = (error * weight).sum() / weight.sum()
        return loss, {"tokens": x0.shape[0] * x0.shape[2] * tokens_per_frame}

    def model_inputs(self, inputs, generator):
        """Keyword inputs of `model` beyond the DiT's (a subclass's conditions, e.g. the pose trainer's)."""
        return {}

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
        """[B, F] sigma of each latent frame: one per sample, or one per block for the causal model."""
        sizes = self.model.block_sizes(num_frames) if self.causal else [num_frames]
        sigma = self.sample_sigmas((batch_size, len(sizes)), generator)
        sigma = sigma.repeat_interleave(torch.tensor(sizes, device=sigma.device), dim=1)
        if self.dit["model_type"] == "ti2v":
            sigma[:, 0] = 0
        return sigma
