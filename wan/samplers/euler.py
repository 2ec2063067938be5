"""First-order Euler integration of the flow ODE dx/dsigma = v."""

from .base import Sampler
from .schedule import FlowSchedule


class EulerSampler(Sampler):
    """x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v_i on the shifted schedule from sigma 1 to 0.

    Stateless. Timesteps are sigma * num_train_timesteps, not truncated, so the model sees the
    exact noise level of its input.
    """

    def __init__(self, num_steps, shift=5.0, num_train_timesteps=1000):
        super().__init__(FlowSchedule.uniform(num_steps, shift, num_train_timesteps))

    def step(self, model_output, timestep, sample, generator=None):
        """sample, model_output: [B, ...]; returns the sample at the next step's sigma."""
        i = self._step_index(timestep)
        dt = self.sigmas[i + 1].item() - self.sigmas[i].item()
        return (sample.float() + dt * model_output.float()).to(sample.dtype)
