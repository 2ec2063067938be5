"""DPM-Solver++(2M) for flow matching, as Wan's `sample_solver='dpm++'` runs it.

Multistep exponential integrator on the data prediction x0 = x_t - sigma * v, in the log-SNR
lambda = log((1 - sigma) / sigma). Wan's configuration: second order (midpoint form), first order on
the first step (no history yet) and on the last step (to sigma = 0), sigmas from
`get_sampling_sigmas` (starting at pure noise, timestep 1000), timesteps truncated to integers.

This class also holds the multistep bookkeeping that UniPC reuses: UniPC's bh2 predictor of order
<= 2 is algebraically this same update.
"""

import math
from dataclasses import dataclass

import torch

from .base import Sampler
from .schedule import FlowSchedule, flow_to_x0


@dataclass
class _Taken:
    """What a multistep solver remembers of the step it last took."""

    index: int
    sample: torch.Tensor  # the sample the update started from (after any correction), float32
    order: int


class DPMPP2MSampler(Sampler):
    """Deterministic multistep solver; call steps in order, once per timestep.

    A step at index 0 starts a new trajectory (history is dropped), so a sampler can be reused for
    several generations; to start mid-schedule again (e.g. from a noised image), call `reset()`.
    """

    def __init__(self, num_steps, shift=5.0, num_train_timesteps=1000):
        super().__init__(FlowSchedule.uniform(num_steps, shift, num_train_timesteps,
                                              sigma_max=self.first_sigma(num_train_timesteps),
                                              integer_timesteps=True))
        self.reset()

    @staticmethod
    def first_sigma(num_train_timesteps):
        """Unshifted sigma of the first step; Wan's `get_sampling_sigmas` starts at pure noise."""
        return 1.0

    def reset(self):
        self._x0s = []  # x0 predictions of the latest (up to 2) steps, oldest first, float32
        self._taken = None

    def step(self, model_output, timestep, sample, generator=None):
        """sample, model_output: [B, ...]; returns the sample at the next step's sigma, sample's dtype."""
        expected = 0 if self._taken is None else self._taken.index + 1
        i = self._step_index(timestep, expected)
        if i == 0:
            self.reset()
        elif self._taken is not None and i != expected:
            raise ValueError(f"multistep sampler got step {i} after step {expected - 1}; "
                             "call reset() to start over")

        x = sample.float()
        x0 = flow_to_x0(model_output.float(), x, self.sigmas[i].item())
        x = self._correct(i, x, x0)
        self._x0s = (self._x0s + [x0])[-2:]
        # First order until there is history, and on the final step into sigma = 0.
        order = 1 if i == self.num_steps - 1 else len(self._x0s)
        self._taken = _Taken(i, x, order)
        return self._predict(i, x, order).to(sample.dtype)

    def _correct(self, i, x, x0):
        """Hook for a corrector that refines the sample at step i once its x0 is known."""
        return x

    def _predict(self, i, x, order):
        """Update from sigma_i to sigma_{i+1} with the newest x0 (and its predecessor for order 2).

        x_next = sigma_{i+1} / sigma_i * x + alpha_{i+1} * (1 - e^-h) * D, with h the log-SNR step
        and D = x0_i, plus half the lambda-divided difference of x0 times h for order 2. The +-inf
        lambdas at sigma = 1 and sigma = 0 give the right limits: e^-h = 0 and a vanishing
        difference term.
        """
        h, keep, weight = self._coefficients(i)
        d = self._x0s[-1]
        if order == 2:
            lam = self.schedule.lambdas
            d = d + 0.5 * (h / (lam[i] - lam[i - 1])) * (self._x0s[-1] - self._x0s[-2])
        return keep * x + weight * d

    def _coefficients(self, i):
        """For the step sigma_i -> sigma_{i+1}: (h, sigma_{i+1} / sigma_i, alpha_{i+1} * (1 - e^-h))."""
        lam = self.schedule.lambdas
        sigma_s, sigma_t = self.sigmas[i].item(), self.sigmas[i + 1].item()
        h = lam[i + 1] - lam[i]
        return h, sigma_t / sigma_s, (1 - sigma_t) * -math.expm1(-h)
