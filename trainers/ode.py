"""ODE regression (CausVid / Self-Forcing `ode_init`): the causal student learns to jump from any
point of the teacher's sampling trajectory straight to its end, the teacher's clean sample.

Data: the folder scripts/generate_ode_pairs.py writes (`data.kind: latents`), whose samples hold the
states `trajectory` [S, C, F, h, w] at the student's few-step timesteps (`distill.denoising_step_list`,
checked against the file's `timesteps`) and the clean `latents`. Each block of latent frames takes
the state at its own random step (per-block timesteps, as diffusion forcing), the student predicts
every frame's x0 in one block-causal forward, and the loss is the MSE to the clean sample. The
result initializes the generator of score distillation (trainers/distillation.py).
"""

import math

import torch
import torch.nn.functional as F

from . import register_trainer
from .diffusion import DiffusionTrainer
from .rollout import DISTILL_DEFAULTS, DISTILL_OPEN_MAPS, block_steps, schedule_problems, student_sampler


def ode_regression_loss(model, trajectory, clean, context, schedule, generator):
    """MSE between the x0 a causal `model` predicts from per-block states of `trajectory`
    [B, S, C, F, h, w] (at the timesteps of `schedule`, a `FewStepSampler`) and `clean` [B, C, F, h, w]."""
    batch, num_steps, channels, num_frames = trajectory.shape[:4]
    steps = block_steps(model.block_sizes(num_frames), batch, num_steps, generator)  # [B, F]
    index = steps[:, None, None, :, None, None].expand(-1, 1, channels, -1, *trajectory.shape[4:])
    x = trajectory.gather(1, index).squeeze(1)
    sigma = schedule.sigmas.to(x.device)[steps][:, None, :, None, None]
    flow = model(x, schedule.timesteps.to(x.device)[steps], context)
    return F.mse_loss(x - sigma * flow.float(), clean)


@register_trainer("ode")
class ODETrainer(DiffusionTrainer):
    defaults = DISTILL_DEFAULTS
    open_maps = DISTILL_OPEN_MAPS

    @classmethod
    def config_problems(cls, cfg):
        if cfg.data.kind != "latents":
            yield "the ode trainer reads ODE pairs (scripts/generate_ode_pairs.py): set data.kind latents"
        if not cfg.causal.enabled or cfg.causal.teacher_forcing:
            yield "the ode trainer trains the causal student: set causal.enabled true and causal.teacher_forcing false"
        if cfg.causal.num_frame_per_block < 1:
            yield f"causal.num_frame_per_block must be >= 1, got {cfg.causal.num_frame_per_block}"
        yield from schedule_problems(cfg)

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        self.schedule = student_sampler(cfg)

    def loss(self, batch, generator):
        timesteps = self.schedule.timesteps
        if not torch.allclose(batch["timesteps"].float().cpu(), timesteps.expand(len(batch["timesteps"]), -1),
                              atol=1e-2):
            raise ValueError(f"ODE pairs at timesteps {batch['timesteps'][0].tolist()}, but distill.* gives the "
                             f"student {timesteps.tolist()}; generate them with the same denoising_step_list and shift")
        trajectory = batch["trajectory"].to(self.device, torch.float32)
        clean = batch["latents"].to(self.device, torch.float32)
        context = [c.to(self.device) for c in batch["context"]]
        loss = ode_regression_loss(self.model, trajectory, clean, context, self.schedule, generator)
        tokens_per_frame = math.prod(clean.shape[3:]) // math.prod(self.dit_model.patch_size[1:])
        return loss, {"tokens": clean.shape[0] * clean.shape[2] * tokens_per_frame}
