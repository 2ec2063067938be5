"""Wan2.2 A14B mixture of experts: two full DiTs, switched by timestep.

The high-noise expert denoises t >= boundary * num_train_timesteps (early, layout-forming steps),
the low-noise expert the rest. Only one expert runs per step, so with `offload=True` the idle one
waits on the CPU while the active one sits on the execution device.
"""

import logging

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


class WanMoE(nn.Module):
    def __init__(self, high_noise_model, low_noise_model, boundary, num_train_timesteps=1000, offload=False,
                 device=None):
        super().__init__()
        self.high_noise_model = high_noise_model
        self.low_noise_model = low_noise_model
        self.boundary = boundary
        self.num_train_timesteps = num_train_timesteps
        self.offload = offload
        self.device = device
        self.last_expert = None  # name of the expert that ran last, for logs and tests

    def expert_name(self, t):
        """'high_noise_model' or 'low_noise_model' for a timestep tensor ([B] or [B, L]; all samples
        of one call must fall on the same side of the boundary)."""
        t = t.reshape(t.shape[0], -1).amax(dim=1)
        high = t >= self.boundary * self.num_train_timesteps
        if bool(high.any()) != bool(high.all()):
            raise ValueError(f"timesteps {t.tolist()} straddle the MoE boundary "
                             f"{self.boundary * self.num_train_timesteps}; call the experts separately")
        return "high_noise_model" if bool(high.all()) else "low_noise_model"

    def expert(self, t):
        name = self.expert_name(t)
        model = getattr(self, name)
        if self.offload:
            idle = self.low_noise_model if name == "high_noise_model" else self.high_noise_model
            idle.to("cpu")
            model.to(self.device)
        if name != self.last_expert:
            log.info("MoE: switching to %s at t=%s", name, t.reshape(-1)[0].item())
        self.last_expert = name
        return model

    def forward(self, x, t, context, **kwargs):
        return self.expert(t)(x, t, context, **kwargs)

    def set_gradient_checkpointing(self, enabled=True, every=1):
        for model in (self.high_noise_model, self.low_noise_model):
            model.set_gradient_checkpointing(enabled, every)

    def offload_all(self):
        """Moves both experts to the CPU (between generations)."""
        for model in (self.high_noise_model, self.low_noise_model):
            model.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
