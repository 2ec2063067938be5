"""The denoising loop of the extension pipelines: any flow-matching sampler, classifier-free guidance
over one batched call with the conditional and unconditional inputs."""

import torch
from tqdm import tqdm

from wan.samplers import get_sampler


@torch.no_grad()
def denoise(predict, noise, settings, num_train_timesteps=1000, generator=None, progress=True, desc="sampling"):
    """Samples from `noise` (any latent shape, e.g. [C, F, H, W] or a batch [B, C, F, H, W]) with
    `settings` (the sampler fields of a resolved `SampleSettings`; a (low, high) guide_scale pair
    guides with its first entry).

    predict(latent, t [1]) -> (cond, uncond) noise predictions shaped as the latent, or uncond None
    when guidance is off. The guided prediction is uncond + guide * (cond - uncond).
    """
    sampler = get_sampler(settings.sample_solver, num_steps=settings.sample_steps, shift=settings.sample_shift,
                          num_train_timesteps=num_train_timesteps)
    guide = settings.guide_scale[0] if isinstance(settings.guide_scale, tuple) else settings.guide_scale
    latent = noise
    for i, t in enumerate(tqdm(sampler.timesteps, desc=desc, disable=not progress, leave=False)):
        cond, uncond = predict(latent, t.reshape(1).to(latent.device))
        prediction = cond if uncond is None else uncond + guide * (cond - uncond)
        latent = sampler.step(prediction, i, latent, generator=generator)
    return latent
