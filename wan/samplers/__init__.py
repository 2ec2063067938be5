"""Flow-matching samplers with one interface (see `base.Sampler`), picked by name:

    sampler = get_sampler("unipc", num_steps=50, shift=5.0, num_train_timesteps=1000)

Names: "unipc" (Wan's default), "dpm++" (alias "dpmpp"), "euler", and "few_step" for distilled
models (takes `denoising_step_list=[1000, 750, 500, 250]` instead of, or consistent with, num_steps).
"""

from .base import Sampler
from .dpmpp import DPMPP2MSampler
from .euler import EulerSampler
from .few_step import FewStepSampler
from .schedule import FlowSchedule, flow_to_x0, shift_sigma
from .unipc import UniPCSampler

SAMPLERS = {
    "unipc": UniPCSampler,
    "dpm++": DPMPP2MSampler,
    "dpmpp": DPMPP2MSampler,
    "euler": EulerSampler,
    "few_step": FewStepSampler,
}


def get_sampler(name, num_steps=None, shift=5.0, num_train_timesteps=1000, **kwargs):
    """A fresh sampler by name; extra keyword arguments go to its class (e.g. few_step's
    `denoising_step_list`, `warp`)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler '{name}'; known: {sorted(SAMPLERS)}")
    return SAMPLERS[name](num_steps=num_steps, shift=shift, num_train_timesteps=num_train_timesteps, **kwargs)


__all__ = ["SAMPLERS", "DPMPP2MSampler", "EulerSampler", "FewStepSampler", "FlowSchedule", "Sampler",
           "UniPCSampler", "flow_to_x0", "get_sampler", "shift_sigma"]
