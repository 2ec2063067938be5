"""Few-step sampling of distilled models (Self-Forcing / DMD / CausVid style).

The model is asked for a clean sample at a handful of timesteps: each step turns its flow prediction
into x0 and, except on the last step, re-noises x0 to the next timestep with fresh Gaussian noise.
The nominal `denoising_step_list` (e.g. [1000, 750, 500, 250]) is warped onto the shifted schedule
as Self-Forcing's `warp_denoising_step` does: t -> T * shift_sigma(t / T, shift), so with shift 5
the model sees 1000, 937.5, 833.3, 625.
"""

import torch

from .base import Sampler
from .schedule import FlowSchedule, flow_to_x0, shift_sigma


class FewStepSampler(Sampler):
    """Stateless x0-predict / re-noise sampler.

    denoising_step_list: nominal timesteps, strictly decreasing, in (0, num_train_timesteps];
        default: num_steps evenly spaced from num_train_timesteps down (4 -> 1000, 750, 500, 250).
    warp: map the list onto the shifted schedule (what Self-Forcing checkpoints were trained with);
        False uses the nominal timesteps as they are.
    """

    def __init__(self, denoising_step_list=None, shift=5.0, num_train_timesteps=1000, num_steps=None, warp=True):
        if denoising_step_list is None:
            if num_steps is None or num_steps < 1:
                raise ValueError(f"few-step sampler needs denoising_step_list or num_steps >= 1, got {num_steps}")
            denoising_step_list = [num_train_timesteps * (num_steps - k) / num_steps for k in range(num_steps)]
        nominal = torch.as_tensor(denoising_step_list, dtype=torch.float64)
        if nominal.ndim != 1 or len(nominal) == 0:
            raise ValueError(f"denoising_step_list must be a non-empty list, got {denoising_step_list}")
        if num_steps is not None and num_steps != len(nominal):
            raise ValueError(f"num_steps {num_steps} disagrees with denoising_step_list {denoising_step_list}")
        if (nominal[1:] >= nominal[:-1]).any() or nominal[-1] <= 0 or nominal[0] > num_train_timesteps:
            raise ValueError(f"denoising_step_list must decrease strictly within (0, {num_train_timesteps}], "
                             f"got {denoising_step_list}")
        sigmas = nominal / num_train_timesteps
        if warp:
            sigmas = shift_sigma(sigmas, shift)
        super().__init__(FlowSchedule(torch.cat([sigmas, sigmas.new_zeros(1)]), sigmas * num_train_timesteps,
                                      num_train_timesteps))

    def step(self, model_output, timestep, sample, generator=None):
        """sample, model_output: [B, ...]; returns x0 on the last step, else x0 re-noised to the next
        timestep with noise drawn from `generator` (on the sample's device)."""
        i = self._step_index(timestep)
        x0 = flow_to_x0(model_output.float(), sample.float(), self.sigmas[i].item())
        sigma_next = self.sigmas[i + 1].item()
        if sigma_next == 0:
            return x0.to(sample.dtype)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return ((1 - sigma_next) * x0 + sigma_next * noise).to(sample.dtype)
