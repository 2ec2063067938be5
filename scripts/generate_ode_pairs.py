"""Teacher ODE trajectories for the student's ODE regression (CausVid / Self-Forcing `ode_init`).

    python scripts/generate_ode_pairs.py --checkpoint_dir Wan2.1-T2V-14B --prompts prompts.txt --output_dir ode_pairs
    torchrun --nproc_per_node 8 scripts/generate_ode_pairs.py ...    # process r takes prompts r, r + N, ...

The teacher (any t2v checkpoint folder, official or diffusers layout; A14B switches experts) samples
each prompt with classifier-free guidance and its official solver, from noise seeded by `--seed` and
the prompt's index. What the student needs is the trajectory at its own few-step schedule
(`--denoising_step_list`, warped as the student's sampler warps it): the state at each of those noise
levels, noise first, and the final clean sample. A level between two solver steps is reached by an
Euler sub-step from the step above it with that step's guided flow; the first level (pure noise) is
the noise itself.

Each prompt becomes its own file <output_dir>/NNNNNN.safetensors (NNNNNN the prompt's index):
`latents` [C, F, h, w] the clean sample, `trajectory` [S, C, F, h, w] the states at the S timesteps
`timesteps` [S], and `context` [L, 4096] the prompt's umT5 embedding; the prompt in the metadata. The
folder is a `data.kind: latents` dataset (trainers/ode.py trains on it; the GAN trainer takes the
clean samples as real videos). Files are written atomically and existing ones are skipped, so an
interrupted run resumes where it stopped.
"""

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.loading import load_components  # noqa: E402
from pipelines.prompt_file import read_prompt_file  # noqa: E402
from pipelines.wan_video import SampleSettings  # noqa: E402
from wan.checkpoint import save_state_dict  # noqa: E402
from wan.samplers import FewStepSampler, get_sampler  # noqa: E402

log = logging.getLogger("generate_ode_pairs")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def ode_trajectory(flow, noise, sampler, sigmas):
    """Runs `sampler` from `noise` with `flow(x, t) -> v`.

    sigmas: decreasing noise levels in (0, 1] at which to record the state.
    Returns (states [len(sigmas), *noise.shape], the final sample).
    """
    sampler.reset()
    teacher = sampler.sigmas.tolist()
    states = [noise if s >= teacher[0] else None for s in sigmas]
    x = noise
    for i, t in enumerate(sampler.timesteps):
        v = flow(x, t)
        for k, s in enumerate(sigmas):
            if states[k] is None and teacher[i + 1] < s <= teacher[i]:
                states[k] = x + (s - teacher[i]) * v
        x = sampler.step(v, i, x)
    return torch.stack(states), x


def guided_flow(components, settings, context, negative, device):
    """The teacher's guided flow v(x, t) for one prompt, x [C, F, h, w]."""
    dit, preset = components.dit, components.preset
    boundary = (preset.moe_boundary or 0) * preset.num_train_timesteps

    def flow(x, t):
        cond, uncond = dit(x[None].expand(2, *x.shape), t.reshape(1).to(device).expand(2), [context, negative])
        scale = settings.guide_scale[1] if preset.is_moe and t.item() >= boundary else settings.guide_scale[0]
        return uncond + scale * (cond - uncond)

    return flow


@torch.no_grad()
def generate_ode_pairs(components, prompts, output_dir, settings, student, rank=0, world_size=1, device="cpu",
                       dtype=torch.float32):
    """Writes the trajectories of prompts rank, rank + world_size, ... (a list of strings) at the
    student's `FewStepSampler` schedule; returns (written, skipped as already done)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    vae, preset = components.vae, components.preset
    width, height = (int(v) for v in settings.size.split("*"))
    shape = (vae.z_dim, (settings.frame_num - 1) // vae.temporal_stride + 1, height // vae.spatial_stride,
             width // vae.spatial_stride)
    sampler = get_sampler(settings.sample_solver, settings.sample_steps, settings.sample_shift,
                          preset.num_train_timesteps)
    sigmas = student.sigmas[:-1].tolist()
    negative = components.text_encoder.encode(settings.negative_prompt, device)[0]
    written = skipped = 0
    for index in range(rank, len(prompts), world_size):
        path = output_dir / f"{index:06d}.safetensors"
        if path.exists():
            skipped += 1
            continue
        context = components.text_encoder.encode(prompts[index], device)[0]
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(settings.seed + index)).to(device)
        states, clean = ode_trajectory(guided_flow(components, settings, context, negative, device), noise, sampler,
                                       sigmas)
        tensors = {"latents": clean, "trajectory": states, "timesteps": student.timesteps, "context": context}
        save_state_dict({k: v.to(dtype) if v.is_floating_point() and k != "timesteps" else v
                         for k, v in tensors.items()}, path, metadata={"text": prompts[index]})
        written += 1
        log.info("%s: %s", path.name, prompts[index][:80])
    return written, skipped


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_dir", required=True, help="the teacher's checkpoint folder")
    parser.add_argument("--task", default="t2v", choices=["t2v", "t2v-A14B"])
    parser.add_argument("--prompts", required=True, help="prompt file, one prompt a line")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--denoising_step_list", type=float, nargs="+", default=[1000, 750, 500, 250],
                        help="the student's few-step schedule (distill.denoising_step_list)")
    parser.add_argument("--timestep_shift", type=float, default=5.0, help="the student's shift, for the warp")
    parser.add_argument("--no_warp", action="store_true", help="the student's schedule is not warped")
    parser.add_argument("--size", help="W*H (default: the preset's first size)")
    parser.add_argument("--frame_num", type=int, help="frames, 4n + 1 (default: the preset's)")
    parser.add_argument("--sample_solver", help="teacher solver (default: the preset's, unipc)")
    parser.add_argument("--sample_steps", type=int, help="teacher steps (default: the preset's)")
    parser.add_argument("--sample_shift", type=float, help="teacher shift (default: the preset's)")
    parser.add_argument("--guide_scale", type=float, help="teacher guidance (default: the preset's)")
    parser.add_argument("--negative_prompt", help="default: the official negative prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="storage dtype of the latents")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    prompts = [job.prompt for job in read_prompt_file(args.prompts, "t2v")]
    components = load_components(args.checkpoint_dir, args.task, device=device)
    settings = SampleSettings(size=args.size, frame_num=args.frame_num, sample_steps=args.sample_steps,
                              sample_shift=args.sample_shift, sample_solver=args.sample_solver,
                              guide_scale=args.guide_scale, negative_prompt=args.negative_prompt,
                              seed=args.seed).resolved(components.preset)
    student = FewStepSampler(args.denoising_step_list, args.timestep_shift, components.preset.num_train_timesteps,
                             warp=not args.no_warp)
    written, skipped = generate_ode_pairs(components, prompts, args.output_dir, settings, student, rank, world_size,
                                          device, DTYPES[args.dtype])
    log.info("rank %d: wrote %d trajectories to %s (%d already there)", rank, written, args.output_dir, skipped)


if __name__ == "__main__":
    main()
