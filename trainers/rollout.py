"""How the causal student makes the videos that distillation losses judge (Self-Forcing, CausVid).

- `self_forcing`: the whole clip block by block from noise, each block denoised through the few-step
  `denoising_step_list` over the KV cache of the blocks before it, then rerun at `context_noise` to
  write the cache: exactly what inference does, so training sees the student's own context.
  Stochastic gradient truncation: each block stops at a random step of the list (its exit step; one
  for all blocks with `same_step_across_blocks`, always the last with `last_step_only`) and its output
  is that step's x0 prediction. Only the exit-step forwards are recorded by autograd: earlier steps
  and the cache reruns run without it, and the cache stores detached keys (wan/modules/kv_cache.py).
- `diffusion_forcing` / `teacher_forcing` (CausVid baselines): clean latents from the data noised to an
  independent step of the list per block, one block-causal forward; its context is the noisy earlier
  blocks, or with teacher forcing the clean ones.

Memory of the self-forcing backward (the KV-cache spike, bounded). Autograd keeps each block's
exit-step forward and nothing else. Its attention reads the earlier frames from the cache: with an
unbounded window through views of the one cache (which then lives until backward; nothing is copied
per block), with a rolling window through a copy per block and layer. With activation checkpointing
(`model.gradient_checkpointing`) a block keeps only each layer's input, [B, block tokens, dim] fp32,
and backward recomputes one layer at a time; without it every layer also keeps its activations and
its attention inputs (the earlier frames' keys and values again, per block: quadratic in the number
of blocks). Peak for Wan2.1-1.3B (30 layers, dim 1536) at 480x832 (1560 tokens a frame), 21 frames
in blocks of 3, bf16, checkpointing, batch 1: cache 21 x 288 MB = 6.0 GB, layer inputs 7 blocks x
30 x 28.8 MB = 6.0 GB, plus one layer's activations during backward, beside the sharded weights and
optimizer states. A cache that kept autograd history instead would chain every block's graph to all
forwards before it, every denoising step of every earlier block included.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from wan.samplers import FewStepSampler

from .diffusion import TeacherForcedCausalWan

ROLLOUTS = ("self_forcing", "teacher_forcing", "diffusion_forcing")
# The `distill` config section of the ODE, score-distillation and GAN trainers, and its open maps.
DISTILL_DEFAULTS = Path(__file__).resolve().parents[1] / "configs" / "distill_defaults.yaml"
DISTILL_OPEN_MAPS = ("distill.real_score.config", "distill.fake_score.config")


def student_sampler(cfg):
    """The student's few-step schedule of a config's `distill` section."""
    d = cfg.distill
    return FewStepSampler(list(d.denoising_step_list), d.timestep_shift, d.num_train_timestep,
                          warp=d.warp_denoising_step)


def schedule_problems(cfg):
    try:
        student_sampler(cfg)
    except ValueError as e:
        yield f"distill.denoising_step_list: {e}"


def rollout_from_config(cfg):
    d = cfg.distill
    return Rollout(d.rollout, d.denoising_step_list, d.timestep_shift, d.warp_denoising_step, d.num_train_timestep,
                   d.same_step_across_blocks, d.last_step_only, d.context_noise)


def block_steps(block_sizes, batch_size, num_steps, generator):
    """[B, F]: a random step of an S-step schedule for each block of each sample, over the block's frames."""
    sizes = torch.tensor(block_sizes, device=generator.device)
    steps = torch.randint(num_steps, (batch_size, len(sizes)), generator=generator, device=generator.device)
    return steps.repeat_interleave(sizes, dim=1)


class CausalGenerator(TeacherForcedCausalWan):
    """The causal student with every use behind `forward`, where FSDP gathers its sharded weights:
    with `kv_cache`, one block at frame `start` through the cache (`forward_block`); otherwise the
    whole clip under the block-causal mask, with `clean` teacher-forced."""

    def forward(self, x, t, context, clip_fea=None, clean=None, kv_cache=None, start=0):
        if kv_cache is None:
            return super().forward(x, t, context, clip_fea, clean=clean)
        return self.forward_block(x, t, start, kv_cache, context=context, clip_fea=clip_fea)


@dataclass
class RolloutOutput:
    video: torch.Tensor    # [B, C, F, h, w] x0 of every frame; autograd reaches the generator's exit steps
    exit_steps: list       # self_forcing: the denoising step each block stopped at; else sample 0's step per frame


def broadcast_from_main(tensor):
    """Rank 0's values on every process, so all run the same forwards (FSDP gathers in lockstep)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(tensor, src=0)
    return tensor


class Rollout:
    """A rollout kind (`ROLLOUTS`) over the student's few-step schedule.

    denoising_step_list, warp, shift, num_train_timesteps: the schedule, as `FewStepSampler`.
    context_noise: timestep of the rerun that writes a finished block into the cache.
    """

    def __init__(self, kind, denoising_step_list, shift=5.0, warp=True, num_train_timesteps=1000,
                 same_step_across_blocks=True, last_step_only=False, context_noise=0):
        if kind not in ROLLOUTS:
            raise ValueError(f"unknown rollout '{kind}'; expected one of {ROLLOUTS}")
        self.kind = kind
        self.sampler = FewStepSampler(list(denoising_step_list), shift, num_train_timesteps, warp=warp)
        self.same_step_across_blocks = same_step_across_blocks
        self.last_step_only = last_step_only
        self.context_noise = context_noise

    def __call__(self, model, context, shape=None, clean=None, *, generator):
        """model: a `CausalGenerator` (possibly FSDP-sharded). context: the text context, a list of
        [L_i, text_dim] or a tensor [B, L, text_dim]. shape: [B, C, F, h, w] of the video
        (self_forcing); clean: clean latents of that shape (the forcing baselines).
        generator: the randomness (noise on its device; the exit steps are rank 0's)."""
        if self.kind == "self_forcing":
            return self.self_forcing(model, context, shape, generator)
        return self.forcing(model, context, clean, generator)

    def exit_steps(self, num_blocks, generator):
        """The denoising step at which each block stops, the same on every process."""
        last = self.sampler.num_steps - 1
        if self.last_step_only:
            return [last] * num_blocks
        draws = 1 if self.same_step_across_blocks else num_blocks
        steps = torch.randint(last + 1, (draws,), generator=generator, device=generator.device)
        return broadcast_from_main(steps).expand(num_blocks).tolist()

    def self_forcing(self, model, context, shape, generator):
        device = generator.device
        num_frames = shape[2]
        sizes = model.block_sizes(num_frames)
        exits = self.exit_steps(len(sizes), generator)
        kv_cache = model.new_kv_cache(num_frames)
        timesteps = self.sampler.timesteps.to(device)
        blocks, start = [], 0
        for size, exit_step in zip(sizes, exits):
            x = torch.randn(*shape[:2], size, *shape[3:], generator=generator, device=device)
            t = timesteps[:exit_step + 1, None].expand(-1, shape[0])
            with torch.no_grad():
                for i in range(exit_step):
                    flow = model(x, t[i], context, kv_cache=kv_cache, start=start)
                    x = self.sampler.step(flow, i, x, generator=generator)
            x0 = self.sampler.to_x0(model(x, t[exit_step], context, kv_cache=kv_cache, start=start), x, t[exit_step])
            blocks.append(x0)
            if start + size < num_frames:
                self.write_context(model, x0.detach(), start, context, kv_cache, generator)
            start += size
        return RolloutOutput(torch.cat(blocks, dim=2), exits)

    @torch.no_grad()
    def write_context(self, model, x0, start, context, kv_cache, generator):
        """Reruns a finished block at `context_noise` (noised to it first) to write the cache."""
        sigma = self.context_noise / self.sampler.num_train_timesteps
        if sigma:
            x0 = (1 - sigma) * x0 + sigma * torch.randn(x0.shape, generator=generator, device=x0.device)
        t = torch.full((x0.shape[0],), float(self.context_noise), device=x0.device)
        model(x0, t, context, kv_cache=kv_cache, start=start)

    def forcing(self, model, context, clean, generator):
        """Diffusion or teacher forcing over clean latents [B, C, F, h, w]: every block noised to its
        own step of the schedule, x0 predicted for the whole clip by one block-causal forward."""
        clean = clean.float()
        steps = block_steps(model.block_sizes(clean.shape[2]), clean.shape[0], self.sampler.num_steps, generator)
        t = self.sampler.timesteps.to(clean.device)[steps]  # [B, F]
        sigma = self.sampler.sigmas.to(clean.device)[steps][:, None, :, None, None]
        noise = torch.randn(clean.shape, generator=generator, device=clean.device)
        x = (1 - sigma) * clean + sigma * noise
        flow = model(x, t, context, clean=clean if self.kind == "teacher_forcing" else None)
        return RolloutOutput(x - sigma * flow, steps[0].tolist())
