"""Shifted flow-matching noise schedule shared by all samplers.

Wan's convention: x_t = (1 - sigma) * x0 + sigma * noise, the model predicts the flow
v = noise - x0, and the model's timestep is sigma * num_train_timesteps. A shift > 1 moves
sampling steps toward high noise: sigma' = shift * sigma / (1 + (shift - 1) * sigma).
"""

import torch


def shift_sigma(sigma, shift):
    """Applies the timestep shift to sigma in [0, 1] (float or tensor); 0 and 1 are fixed points."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def flow_to_x0(model_output, sample, sigma):
    """Clean-sample prediction x0 = x_t - sigma * v (sigma broadcastable to the sample)."""
    return sample - sigma * model_output


def per_sample_view(values, sample):
    """Reshapes per-sample values (scalar or [B]) to broadcast against a [B, ...] sample."""
    return values.reshape(values.shape + (1,) * (sample.ndim - values.ndim))


class FlowSchedule:
    """The sigmas of one sampling trajectory and the timesteps the model is called with.

    sigmas: [N + 1] float32, sigmas[i] is the noise level of the sample the model sees at step i;
        sigmas[N] is where the trajectory ends (0: fully denoised).
    timesteps: [N] float32, the model's timestep at each step.
    """

    def __init__(self, sigmas, timesteps, num_train_timesteps):
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        timesteps = torch.as_tensor(timesteps, dtype=torch.float64)
        if sigmas.ndim != 1 or timesteps.shape != (len(sigmas) - 1,):
            raise ValueError(f"need N + 1 sigmas for N timesteps, "
                             f"got {tuple(sigmas.shape)} and {tuple(timesteps.shape)}")
        self.sigmas = sigmas.float()
        self.timesteps = timesteps.float()
        self.num_train_timesteps = num_train_timesteps
        # log-SNR log(alpha / sigma) with alpha = 1 - sigma; +-inf at the ends (sigma 0 or 1), which the
        # multistep solvers' exponential integrators handle as limits. From the float32 sigmas, as the
        # official solvers compute it.
        s = self.sigmas.double()
        self.lambdas = (torch.log1p(-s) - torch.log(s)).tolist()

    @classmethod
    def uniform(cls, num_steps, shift, num_train_timesteps=1000, sigma_max=1.0, integer_timesteps=False):
        """N steps evenly spaced in unshifted sigma from sigma_max down to (excluding) 0, then shifted.

        The official Wan solvers truncate timesteps to integers (their int64 cast); the sigmas keep
        full precision either way.
        """
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {num_steps}")
        # Spaced as numpy's linspace (start + i * step), which the official code uses: truncating to
        # integer timesteps is sensitive to the last bit.
        base = torch.arange(num_steps + 1, dtype=torch.float64) * (-sigma_max / num_steps) + sigma_max
        base[-1] = 0.0
        sigmas = shift_sigma(base, shift)
        timesteps = sigmas[:-1] * num_train_timesteps
        if integer_timesteps:
            timesteps = timesteps.trunc()
        return cls(sigmas, timesteps, num_train_timesteps)

    def __len__(self):
        return len(self.timesteps)

    def index_of(self, timestep, expected=None):
        """Step index whose timestep equals `timestep` (within 1e-3).

        With repeated timesteps (integer truncation of a dense schedule), `expected` picks the step
        the caller is at.
        """
        t = float(timestep)
        if expected is not None and expected < len(self) and abs(self.timesteps[expected].item() - t) <= 1e-3:
            return expected
        matches = ((self.timesteps - t).abs() <= 1e-3).nonzero()
        if len(matches) == 0:
            raise ValueError(f"timestep {t} is not in this schedule: {self.timesteps.tolist()}")
        return matches[0].item()

    def sigma_of(self, timestep):
        """Sigmas (shape of `timestep`) of the nearest schedule points, the end point (t = 0) included."""
        timestep = torch.as_tensor(timestep, dtype=torch.float32)
        table = torch.cat([self.timesteps, self.timesteps.new_zeros(1)]).to(timestep.device)
        nearest = (table - timestep.reshape(-1, 1)).abs().argmin(dim=1)
        return self.sigmas.to(timestep.device)[nearest].reshape(timestep.shape)
