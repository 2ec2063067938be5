"""UniPC (bh2, order 2, data prediction) for flow matching: Wan's default solver.

Each step first corrects the incoming sample with UniC, using the x0 just predicted there, then
takes the UniP predictor step. UniP of order <= 2 with B(h) = e^-h - 1 (bh2) and rho = 1/2 is the
DPM-Solver++(2M) update, so predictor and bookkeeping come from DPMPP2MSampler. As Wan configures
it: lower-order final step, corrector on every step after the first, and the x0 history keeps the
prediction from the uncorrected sample.
"""

import math

import torch

from .dpmpp import DPMPP2MSampler


class UniPCSampler(DPMPP2MSampler):
    """UniPC multistep predictor-corrector; same calling rules as DPMPP2MSampler."""

    @staticmethod
    def first_sigma(num_train_timesteps):
        # The official scheduler spans its fp32 training sigmas, which start one train step below
        # pure noise (hence the first timestep 999).
        return torch.tensor(1 - 1 / num_train_timesteps, dtype=torch.float32).item()

    def _correct(self, i, x, x0):
        """UniC: redo the previous step from its start with the new x0_i as extra information.

        Order (1 or 2) is the previous step's. With e = e^-h - 1 it solves for rho on the
        moments b_k of the phi functions, as UniPC's bh2 variant; order 1 uses rho = 1/2.
        """
        taken = self._taken
        if taken is None:
            return x
        lam = self.schedule.lambdas
        h, _, weight = self._coefficients(i - 1)
        m0 = self._x0s[-1]
        if taken.order == 1:
            correction = 0.5 * (x0 - m0)
        else:
            r = (lam[i - 2] - lam[i - 1]) / h
            hh = -h
            e = math.expm1(hh)
            b1 = (e / hh - 1) / e
            b2 = 2 * ((e / hh - 1) / hh - 0.5) / e
            rho_prev = (b1 - b2) / (1 - r)
            correction = (rho_prev / r) * (self._x0s[-2] - m0) + (b1 - rho_prev) * (x0 - m0)
        return self._predict(i - 1, taken.sample, 1) + weight * correction
