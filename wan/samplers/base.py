"""The interface every sampler implements, so pipelines and trainers can swap solvers.

A sampling loop:

    sampler = get_sampler("unipc", num_steps=50, shift=5.0)
    for t in sampler.timesteps:
        v = model(x, t)                  # flow prediction v = noise - x0
        x = sampler.step(v, t, x, generator=g)

`step` takes the step either as a Python int index into `timesteps` or as the timestep value itself
(a tensor or float, e.g. the loop variable above).
"""

import torch

from .schedule import flow_to_x0, per_sample_view


class Sampler:
    """Base class: a FlowSchedule plus the conversions pipelines and trainers need."""

    def __init__(self, schedule):
        self.schedule = schedule

    @property
    def timesteps(self):
        """[N] float32 timesteps the model is called with, in order."""
        return self.schedule.timesteps

    @property
    def sigmas(self):
        """[N + 1] float32 noise levels: sigmas[i] at step i, sigmas[N] the trajectory's end."""
        return self.schedule.sigmas

    @property
    def num_steps(self):
        return len(self.schedule)

    @property
    def num_train_timesteps(self):
        return self.schedule.num_train_timesteps

    def reset(self):
        """Forgets per-trajectory state; samplers without history have nothing to forget."""

    def step(self, model_output, timestep, sample, generator=None):
        """Advances `sample` [B, ...] at step `timestep` to the next step's sample, given the model's
        flow prediction [B, ...] there. `generator` feeds samplers that draw noise."""
        raise NotImplementedError

    def to_x0(self, model_output, sample, timestep):
        """x0 = x_t - sigma * v; timestep: scalar or [B] (nearest schedule point)."""
        return flow_to_x0(model_output, sample, self._sigma(timestep, sample))

    def add_noise(self, x0, noise, timestep):
        """x_t = (1 - sigma) * x0 + sigma * noise; timestep: scalar or [B] (nearest schedule point)."""
        sigma = self._sigma(timestep, x0)
        return (1 - sigma) * x0 + sigma * noise

    def _sigma(self, timestep, sample):
        sigma = self.schedule.sigma_of(torch.as_tensor(timestep, device=sample.device))
        return per_sample_view(sigma, sample).to(sample.dtype)

    def _step_index(self, timestep, expected=None):
        """Step index for an int index or a timestep value."""
        if isinstance(timestep, int):
            if not 0 <= timestep < self.num_steps:
                raise IndexError(f"step index {timestep} out of range for {self.num_steps} steps")
            return timestep
        return self.schedule.index_of(timestep, expected)
