"""Block-by-block generation with a causal Wan model (Self-Forcing / CausVid), streamed as it is made.

    model = CausalWanModel(load_dit(...), num_frame_per_block=3)
    pipe = CausalPipeline.few_step(model, [1000, 750, 500, 250], shift=5.0)
    for frames in pipe.stream_video(vae, context, num_frames=21, latent_size=(60, 104), generator=g):
        show(frames)  # [B, 3, T, H, W] in [-1, 1]: 9 frames for a first block of 3 latent frames, then 12

Each block starts from noise and runs the sampler's steps, each a forward of the block over the KV
cache of the earlier blocks. The finished block then runs once more at timestep `context_noise` so
that later blocks attend to the keys and values of the clean block rather than a noisy step's.
The few-step pipeline uses the distilled model's `denoising_step_list`; the multi-step pipeline any
sampler of `wan.samplers` with classifier-free guidance, the conditional and the unconditional branch
each with its own caches. Conditions of the whole video (I2V's `y` and CLIP tokens, pose tokens as
`add_condition`) are given once and sliced per block. Blocks come out as soon as they are done
(`generate` yields latents, `stream_video` pixels through the streaming VAE decoder), for any
number of frames.
"""

import math
from itertools import accumulate

import torch

from wan.modules.causal_model import CausalWanModel
from wan.modules.vae_streaming import StreamingDecoder
from wan.samplers import get_sampler


class CausalPipeline:
    """A causal model, a sampler run on every block, and the guidance between branches.

    guide_scale: classifier-free guidance; 1 runs the conditional branch only.
    context_noise: timestep of the rerun that writes a finished block into the cache; above 0 the
        clean block is noised to it first (as Self-Forcing's training does).
    """

    def __init__(self, model, sampler, guide_scale=1.0, context_noise=0, static_shapes=False):
        """static_shapes: KV caches with fixed-shape steps, for CUDA graphs (see `wan.modules.kv_cache`)."""
        self.model = model
        self.sampler = sampler
        self.guide_scale = guide_scale
        self.context_noise = context_noise
        self.static_shapes = static_shapes

    @classmethod
    def few_step(cls, model, denoising_step_list=(1000, 750, 500, 250), shift=5.0, warp=True, context_noise=0,
                 num_train_timesteps=1000):
        """Distilled models (Self-Forcing DMD, CausVid): a few x0 predictions per block, no guidance."""
        sampler = get_sampler("few_step", shift=shift, num_train_timesteps=num_train_timesteps,
                              denoising_step_list=list(denoising_step_list), warp=warp)
        return cls(model, sampler, context_noise=context_noise)

    @classmethod
    def multi_step(cls, model, solver="unipc", num_steps=50, shift=5.0, guide_scale=5.0, num_train_timesteps=1000):
        """Causal diffusion models: a full solver trajectory per block with classifier-free guidance."""
        return cls(model, get_sampler(solver, num_steps, shift, num_train_timesteps), guide_scale=guide_scale)

    @torch.no_grad()
    def generate(self, context, num_frames, latent_size, negative_context=None, prefix=None, noise=None,
                 generator=None, *, y=None, clip_fea=None, add_condition=None):
        """Yields the latents of each finished block, [B, C, F_block, h, w] float32, in order.

        context: text embeddings [B, Lt, text_dim] (or a list of [Lt_i, text_dim]); negative_context
            likewise, for guidance.  num_frames: latent frames of the video, the prefix's included.
        latent_size: (h, w) of the latent grid.  prefix: [B, C, P, h, w] clean latents the video starts
            with (image-to-video: the image's latent, P = 1 with `independent_first_frame`; or a video
            to continue), P on a block boundary; its blocks are written to the cache and yielded as is.
        noise: [B, C, num_frames - P, h, w] starting noise; by default each block draws its own from
            `generator`, which also feeds samplers that re-noise.
        y: condition channels of the whole video [B, Cy, num_frames, h, w] (Wan2.1 I2V), both branches.
        clip_fea: CLIP image tokens [B, 257, 1280], both branches.
        add_condition: token condition of the whole video [B, num_frames * tokens_per_frame, dim] (pose
            tokens), computed once; each block takes its frames' slice, on the conditional branch only.
        """
        model = self.model
        sizes = model.block_sizes(num_frames)
        given = 0 if prefix is None else prefix.shape[2]
        boundaries = [0, *accumulate(sizes)]
        if given not in boundaries:
            raise ValueError(f"prefix of {given} frames does not end on a block boundary; blocks of "
                             f"{num_frames} frames start at {boundaries}")
        tokens_per_frame = math.prod(latent_size) // math.prod(model.model.patch_size[1:])
        check_video_condition(y, add_condition, num_frames, tokens_per_frame)

        def new_cache():  # a static-shape cache is allocated for the whole video at once
            return model.new_kv_cache(num_frames if self.static_shapes else None, self.static_shapes)

        branches = [(new_cache(), model.cross_cache(context, clip_fea), add_condition)]
        if self.guide_scale != 1:
            if negative_context is None:
                raise ValueError(f"guide_scale {self.guide_scale} needs negative_context")
            branches.append((new_cache(), model.cross_cache(negative_context, clip_fea), None))
        channels, device = model.model.out_dim, model.model.device
        for start, size in zip(boundaries, sizes):
            block = [(kv, cross, block_condition(y, condition, start, size, tokens_per_frame))
                     for kv, cross, condition in branches]
            if start < given:
                latents = prefix[:, :, start:start + size].to(device, torch.float32)
            else:
                x = (torch.randn(len(context), channels, size, *latent_size, generator=generator, device=device)
                     if noise is None else noise[:, :, start - given:start - given + size].to(device))
                latents = self._denoise(x, start, block, generator)
            yield latents
            if start + size < num_frames:
                self._write_context(latents, start, block, generator)

    def _denoise(self, x, start, branches, generator):
        self.sampler.reset()
        for i, t in enumerate(self.sampler.timesteps):
            x = self.sampler.step(self._predict(x, t, start, branches), i, x, generator=generator)
        return x

    def _predict(self, x, t, start, branches):
        """Flow prediction of the block, guided when there are two branches."""
        t = torch.full((x.shape[0],), float(t), device=x.device)
        flows = [self.model.forward_block(x, t, start, kv, cross, **inputs) for kv, cross, inputs in branches]
        if len(flows) == 1:
            return flows[0]
        cond, uncond = flows
        return uncond + self.guide_scale * (cond - uncond)

    def _write_context(self, latents, start, branches, generator):
        """Reruns the finished block at `context_noise` so its keys and values are the cache's."""
        if self.context_noise:
            sigma = self.context_noise / self.sampler.num_train_timesteps
            noise = torch.randn(latents.shape, generator=generator, device=latents.device)
            latents = (1 - sigma) * latents + sigma * noise
        t = torch.full((latents.shape[0],), float(self.context_noise), device=latents.device)
        for kv, cross, inputs in branches:
            self.model.forward_block(latents, t, start, kv, cross, **inputs)

    @torch.no_grad()
    def stream_video(self, vae, *args, tiled=False, **kwargs):
        """`generate`, each block decoded by the streaming VAE decoder as soon as it is done: yields
        pixels [B, 3, T_block, H, W] in [-1, 1] (1 + 4(F - 1) frames for the first block of F latent
        frames, 4F for the others with the Wan VAEs) that, concatenated, equal decoding the whole video."""
        decoder = StreamingDecoder(vae, tiled=tiled)
        for latents in self.generate(*args, **kwargs):
            yield decoder.decode(latents)


def check_video_condition(y, add_condition, num_frames, tokens_per_frame):
    """Whole-video conditions must cover every latent frame, so that each block finds its slice."""
    if y is not None and y.shape[2] != num_frames:
        raise ValueError(f"y covers {y.shape[2]} latent frames, the video has {num_frames}")
    if add_condition is not None and add_condition.shape[1] != num_frames * tokens_per_frame:
        raise ValueError(f"add_condition has {add_condition.shape[1]} tokens; {num_frames} latent frames of "
                         f"{tokens_per_frame} tokens need {num_frames * tokens_per_frame}")


def block_condition(y, add_condition, start, size, tokens_per_frame):
    """`forward_block`'s y and add_condition for the block of latent frames [start, start + size)."""
    inputs = {}
    if y is not None:
        inputs["y"] = y[:, :, start:start + size]
    if add_condition is not None:
        inputs["add_condition"] = add_condition[:, start * tokens_per_frame:(start + size) * tokens_per_frame]
    return inputs


def causal_model_from_config(model, config):
    """Wraps a WanModel with the causal options of a Self-Forcing-style config (`num_frame_per_block`,
    `independent_first_frame`, `model_kwargs.local_attn_size` / `sink_size`)."""
    model_kwargs = config.get("model_kwargs", {})
    return CausalWanModel(model, num_frame_per_block=config.get("num_frame_per_block", 3),
                          local_attn_size=model_kwargs.get("local_attn_size", -1),
                          sink_size=model_kwargs.get("sink_size", 0),
                          independent_first_frame=config.get("independent_first_frame", False))


def pipeline_from_config(model, config):
    """The pipeline a config asks for: few-step when it has a `denoising_step_list`, else multi-step
    with `sample_solver`, `sample_steps` and `guidance_scale`."""
    shift = config.get("timestep_shift", 5.0)
    num_train_timesteps = config.get("num_train_timestep", 1000)
    if "denoising_step_list" in config:
        return CausalPipeline.few_step(model, config["denoising_step_list"], shift,
                                       warp=config.get("warp_denoising_step", True),
                                       context_noise=config.get("context_noise", 0),
                                       num_train_timesteps=num_train_timesteps)
    return CausalPipeline.multi_step(model, config.get("sample_solver", "unipc"), config.get("sample_steps", 50),
                                     shift, config.get("guidance_scale", 5.0), num_train_timesteps)
