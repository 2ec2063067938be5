"""Text/image-to-video generation with the bidirectional Wan DiT: T2V, I2V, FLF2V, TI2V-5B and the
Wan2.2 A14B mixture of experts, with classifier-free guidance and any flow-matching sampler."""

import logging
from dataclasses import dataclass

import torch
from tqdm import tqdm

from wan.samplers import get_sampler
from wan.samplers.cfg_skip import cfg_skipped

from .conditioning import first_frame_token_mask, image_latent_grid, image_to_video_condition, known_frame_mask
from .validation import InvalidInput, check_frame_num, check_positive, check_size
from .video_io import resize_cover

log = logging.getLogger(__name__)


@dataclass
class SampleSettings:
    """One generation's settings; None means the preset's default."""
    size: str = None           # "W*H"
    frame_num: int = None
    sample_steps: int = None
    sample_shift: float = None
    sample_solver: str = None
    guide_scale: object = None  # float, or (low_noise, high_noise) for A14B
    negative_prompt: str = None
    seed: int = 0

    def resolved(self, preset):
        """A copy with every default filled in from the preset and every value checked."""
        guide = preset.guide_scale if self.guide_scale is None else self.guide_scale
        if isinstance(guide, (int, float)):
            guide = (float(guide), float(guide))
        settings = SampleSettings(
            size=self.size or preset.sizes[0], frame_num=self.frame_num or preset.frame_num,
            sample_steps=self.sample_steps or preset.sample_steps,
            sample_shift=preset.sample_shift if self.sample_shift is None else self.sample_shift,
            sample_solver=self.sample_solver or preset.sample_solver, guide_scale=tuple(guide),
            negative_prompt=preset.negative_prompt if self.negative_prompt is None else self.negative_prompt,
            seed=self.seed)
        check_size(preset, settings.size)
        check_frame_num(settings.frame_num)
        check_positive("sample_steps", settings.sample_steps)
        return settings


class WanVideoPipeline:
    """Generates videos from prompts (and images) with loaded `WanComponents`.

    offload_model: keep the DiT on the CPU except while sampling (the A14B MoE moves only the
        active expert to the device).
    vae_tiling: encode/decode in overlapping spatial tiles (bounded memory at 720p).
    teacache: a `wan.teacache.TeaCache` skipping the DiT blocks on steps whose timestep embedding
        barely changed (reset and attached to the DiT at each generation); None runs every step.
    cfg_skip_ratio: the last fraction of the steps runs only the conditional branch (0: never).
    memory_mode: the `wan.offload` memory mode the caller applied to the DiT, which then places its
        weights itself (the pipeline does not move it).
    """

    def __init__(self, components, device="cpu", offload_model=False, vae_tiling=False, teacache=None,
                 cfg_skip_ratio=0.0, memory_mode=None):
        self.components = components
        self.preset = components.preset
        self.device = torch.device(device)
        self.offload_model = offload_model
        self.vae_tiling = vae_tiling
        self.teacache = teacache
        self.cfg_skip_ratio = cfg_skip_ratio
        self.memory_mode = memory_mode
        self.expert_trace = []  # (timestep, expert) per step of the last A14B generation

    @property
    def task(self):
        return self.preset.task

    def _encode_prompts(self, prompt, negative_prompt):
        if not prompt or not prompt.strip():
            raise InvalidInput("prompt is empty; give a description of the video")
        context, context_null = self.components.text_encoder.encode([prompt, negative_prompt], device=self.device)
        return context, context_null

    def _condition(self, settings, image, last_image):
        """Latent shape, DiT keyword arguments and (TI2V) the clean image latent with its token mask."""
        vae, preset = self.components.vae, self.preset
        width, height = (int(v) for v in settings.size.split("*"))
        frames = (settings.frame_num - 1) // vae.temporal_stride + 1
        lat_h, lat_w = height // vae.spatial_stride, width // vae.spatial_stride
        kwargs, image_latent = {}, None
        needs_image = preset.task in ("i2v", "flf2v")
        if needs_image and image is None:
            raise InvalidInput(f"task {preset.name} needs an input image")
        if preset.task == "flf2v" and last_image is None:
            raise InvalidInput("task flf2v needs a last frame image as well")
        if needs_image:
            lat_h, lat_w = image_latent_grid(image, height * width, preset.vae_stride, preset.patch_size)
            images = [image] if last_image is None else [image, last_image]
            kwargs["y"] = image_to_video_condition(vae, images, settings.frame_num, lat_h, lat_w)[None]
            if preset.use_clip:
                clip = self.components.clip
                kwargs["clip_fea"] = clip.encode([img[:, None].to(clip.device) for img in images]).to(self.device)
        elif preset.task == "ti2v" and image is not None:
            pixels = resize_cover(image.float(), width, height)[:, None]
            image_latent = vae.encode(pixels[None].to(vae.conv2.weight.device))[0].to(self.device)
        kwargs = {k: v.to(self.device) for k, v in kwargs.items()}
        return (vae.z_dim, frames, lat_h, lat_w), kwargs, image_latent

    def _timestep(self, t, latent_shape, image_latent):
        """[1] timestep, or [1, L] per token for TI2V with an image (first frame at t=0)."""
        t = t.reshape(1).to(self.device)
        if image_latent is None:
            return t
        token_mask = first_frame_token_mask(latent_shape[1], latent_shape[2], latent_shape[3], self.preset.patch_size)
        return (token_mask.to(self.device) * t)[None]

    @staticmethod
    def _predict(dit, latent, timestep, contexts, kwargs, cond_only=False):
        """(cond, uncond) flow predictions: one batch [cond, uncond], or with `cond_only` (cfg skip)
        the conditional prediction for both."""
        if cond_only:
            pred = dit(latent[None], timestep, contexts[:1], **kwargs)[0]
            return pred, pred
        batch = latent[None].expand(2, *latent.shape)
        return dit(batch, timestep.expand(2, *timestep.shape[1:]), contexts,
                   **{k: torch.cat([v, v]) for k, v in kwargs.items()})

    @torch.no_grad()
    def generate(self, prompt, image=None, last_image=None, settings=None, progress=True):
        """Returns the video [3, F, H, W] in [-1, 1] on the CPU (float32).

        image / last_image: [3, H, W] tensors in [-1, 1] (see `video_io.image_to_tensor`).
        """
        settings = (settings or SampleSettings()).resolved(self.preset)
        context, context_null = self._encode_prompts(prompt, settings.negative_prompt)
        shape, kwargs, image_latent = self._condition(settings, image, last_image)

        generator = torch.Generator().manual_seed(settings.seed)  # CPU noise: the same on every device
        latent = torch.randn(shape, generator=generator).to(self.device)
        if image_latent is not None:
            keep = known_frame_mask(settings.frame_num, shape[2], shape[3])[:1].to(self.device)
            latent = keep * image_latent + (1 - keep) * latent

        dit = self.components.dit
        if not self.preset.is_moe and self.memory_mode is None:
            dit.to(self.device)
        sampler = get_sampler(settings.sample_solver, num_steps=settings.sample_steps, shift=settings.sample_shift,
                              num_train_timesteps=self.preset.num_train_timesteps)
        boundary = (self.preset.moe_boundary or 0) * self.preset.num_train_timesteps
        self.expert_trace = []
        if self.teacache is not None:
            self.teacache.reset(num_steps=sampler.num_steps)
            self.teacache.attach(dit)
        steps = tqdm(sampler.timesteps, desc="sampling", disable=not progress, leave=False)
        for i, t in enumerate(steps):
            timestep = self._timestep(t, shape, image_latent)
            pred_cond, pred_uncond = self._predict(dit, latent, timestep, [context, context_null], kwargs,
                                                   cfg_skipped(i, sampler.num_steps, self.cfg_skip_ratio))
            high_noise = self.preset.is_moe and t.item() >= boundary
            guide = settings.guide_scale[1] if high_noise else settings.guide_scale[0]
            if self.preset.is_moe:
                self.expert_trace.append((t.item(), dit.last_expert))
            noise_pred = pred_uncond + guide * (pred_cond - pred_uncond)
            latent = sampler.step(noise_pred, i, latent, generator=generator)
            if image_latent is not None:
                latent = keep * image_latent + (1 - keep) * latent
        if self.teacache is not None:
            self.teacache.detach(dit)
        if self.offload_model:
            dit.offload_all() if self.preset.is_moe else dit.to("cpu")
        video = self.components.vae.decode(latent[None].to(self.components.vae.conv2.weight.device),
                                           tiled=self.vae_tiling)
        return video[0].cpu()
