"""Batch video generation from a prompt file with any Wan checkpoint folder.

    python inference.py --task t2v --checkpoint_dir Wan2.1-T2V-1.3B --data_path prompts/t2v_examples.txt \
        --output_folder outputs/ [--config_path configs/x.yaml] [--size 832*480] [--frame_num 81] \
        [--sample_steps 50] [--seed 0] [--lora my_lora.safetensors:0.8] [--dit_checkpoint DIR --use_ema]

    torchrun --nproc_per_node 8 inference.py ... --ulysses_size 8 [--dit_fsdp] [--t5_fsdp]

Settings come from the task's preset, then the YAML config, then the command line. A config with
`num_frame_per_block` (e.g. configs/self_forcing_dmd.yaml) runs the causal streaming pipeline:
blocks are decoded and written to the mp4 as they finish, for any `--num_output_frames`.
Extension tasks (`pipelines/extensions/`: multi-reference, pose, audio, Fun/VACE/Animate) take
their own prompt-file fields, listed by `--help`. Every input is checked before any weights are
loaded. Each prompt gives `NNN_<words>.mp4` and a JSON sidecar. Under torchrun every process checks the same inputs and generates the same video
(sequence parallel and/or sharded, see pipelines/distributed.py); rank 0 writes the files.
"""

import argparse
import json
import logging
import os
import re
import sys
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from pipelines.causal import causal_model_from_config, pipeline_from_config
from pipelines.extensions import ExtensionTask, extension_tasks
from pipelines.distributed import (ParallelOptions, check_parallel, close_parallel, init_parallel,
                                   launched_processes, parallelize)
from pipelines.loading import TASK_PRESETS, check_folder, load_components, replace_dit_weights, trained_dit_weights
from pipelines.prompt_file import read_extension_prompt_file, read_prompt_file
from pipelines.validation import InvalidInput, check_image_file, check_positive, check_size
from pipelines.video_io import image_to_tensor, resize_cover, video_writer, write_frames
from pipelines.wan_video import SampleSettings, WanVideoPipeline
from wan.audio.decode import mux_audio
from wan.checkpoint import CheckpointError
from wan.lora import fuse_lora
from wan.offload import MEMORY_MODES, apply_memory_mode
from wan.onednn_linear import use_onednn_linears
from wan.teacache import TeaCache, teacache_coefficients

log = logging.getLogger("inference")

SETTING_KEYS = ("size", "frame_num", "sample_steps", "sample_shift", "sample_solver", "guide_scale",
                "negative_prompt", "seed")
# Keys of Self-Forcing-style causal configs (see configs/self_forcing_dmd.yaml).
CAUSAL_KEYS = ("model_name", "generator_ckpt", "use_ema", "denoising_step_list", "warp_denoising_step",
               "num_train_timestep", "timestep_shift", "context_noise", "num_frame_per_block",
               "independent_first_frame", "num_output_frames", "model_kwargs", "image_or_video_shape",
               "guidance_scale", "sample_solver", "sample_steps", "negative_prompt", "seed", "size")


def task_help(extensions):
    lines = [f"  {t.name}: {t.description}; lines '{'<TAB>'.join(t.fields + ('prompt',))}'"
             + (f" ({', '.join(t.optional)} may be empty)" if t.optional else "") for t in extensions.values()]
    return "extension tasks:\n" + "\n".join(lines) if lines else ""


def parse_args(argv=None):
    extensions = extension_tasks()
    parser = argparse.ArgumentParser(description=__doc__, epilog=task_help(extensions),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=sorted(TASK_PRESETS) + sorted(extensions))
    parser.add_argument("--checkpoint_dir", required=True)
    parser.add_argument("--data_path", required=True, help="prompt file (see pipelines/prompt_file.py)")
    parser.add_argument("--output_folder", required=True)
    parser.add_argument("--config_path", help="YAML with any of the settings below, or a causal config")
    parser.add_argument("--size", help="W*H as the official CLI, e.g. 832*480")
    parser.add_argument("--frame_num", type=int, help="4n+1 frames")
    parser.add_argument("--num_output_frames", type=int, help="causal configs: latent frames to generate")
    parser.add_argument("--sample_steps", type=int)
    parser.add_argument("--sample_shift", type=float)
    parser.add_argument("--sample_solver", choices=["unipc", "dpm++", "euler"])
    parser.add_argument("--guide_scale", type=float, nargs="+", help="one value, or low-noise high-noise for A14B")
    parser.add_argument("--negative_prompt")
    parser.add_argument("--seed", type=int, help="base seed; prompt i uses seed + i")
    parser.add_argument("--fps", type=int, help="default: the preset's (16; 24 for TI2V-5B)")
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                        help="fuse a LoRA file into the DiT (repeatable)")
    parser.add_argument("--dit_checkpoint", help="trained DiT weights over the folder's: a train.py export "
                                                 "folder, a weight file or a Self-Forcing .pt")
    parser.add_argument("--use_ema", action="store_true", help="take the EMA weights of --dit_checkpoint")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="DiT dtype")
    parser.add_argument("--offload_model", action="store_true", help="keep the DiT on the CPU when idle")
    parser.add_argument("--memory_mode", choices=MEMORY_MODES,
                        help="VideoX-Fun's GPU memory mode for the DiT (wan/offload.py), applied after --lora fusion")
    parser.add_argument("--t5_cpu", action="store_true", help="run the text encoder on the CPU")
    parser.add_argument("--vae_tiling", action="store_true", help="decode in spatial tiles (bounded memory)")
    parser.add_argument("--teacache_threshold", type=float, default=0.0,
                        help="TeaCache: skip the DiT blocks on steps whose accumulated timestep-embedding change "
                             "stays below this (0 = off; 0.1 is VideoX-Fun's default), see wan/teacache.py")
    parser.add_argument("--teacache_model", help="release name whose TeaCache coefficients to use "
                                                 "(default: the checkpoint folder's name, e.g. Wan2.1-T2V-1.3B)")
    parser.add_argument("--cfg_skip_ratio", type=float, default=0.0,
                        help="the last fraction of the steps runs only the conditional branch (0 = off)")
    parser.add_argument("--ulysses_size", type=int, default=1,
                        help="sequence parallel degree, the number of torchrun processes; must divide the heads")
    parser.add_argument("--dit_fsdp", action="store_true", help="shard the DiT's weights over the processes")
    parser.add_argument("--t5_fsdp", action="store_true", help="shard the text encoder's weights over the processes")
    return parser.parse_args(argv)


def read_config(path):
    if not path:
        return {}
    from omegaconf import OmegaConf

    if not Path(path).is_file():
        raise InvalidInput(f"config file not found: {path}")
    return OmegaConf.to_container(OmegaConf.load(path))


def is_causal(config):
    return "num_frame_per_block" in config


def merged_settings(args, config):
    """Preset defaults < YAML config < command line."""
    known = CAUSAL_KEYS if is_causal(config) else SETTING_KEYS + ("fps", "task")
    unknown = set(config) - set(known)
    if unknown:
        raise InvalidInput(f"{args.config_path}: unknown setting(s) {sorted(unknown)}; known: {sorted(known)}")
    values = {k: v for k, v in config.items() if k in SETTING_KEYS or k == "fps"}
    values.update({k: getattr(args, k) for k in SETTING_KEYS + ("fps",) if getattr(args, k) is not None})
    guide = values.get("guide_scale")
    if isinstance(guide, (list, tuple)):
        values["guide_scale"] = guide[0] if len(guide) == 1 else tuple(guide)
    fps = values.pop("fps", None)
    return SampleSettings(**{k: v for k, v in values.items() if k in SETTING_KEYS}), fps


def parse_lora(spec):
    path, _, scale = spec.rpartition(":") if re.search(r":[-+.\d]+$", spec) else (spec, "", "")
    if not Path(path).is_file():
        raise InvalidInput(f"LoRA file not found: {path}")
    return path, float(scale) if scale else 1.0


def output_stem(index, prompt):
    words = "_".join(re.findall(r"[A-Za-z0-9]+", prompt)[:6]) or "video"
    return f"{index:03d}_{words}"


class BidirectionalRunner:
    """Whole-clip generation: T2V, I2V, FLF2V, TI2V, A14B."""

    def __init__(self, components, args, settings, progress=True):
        self.pipeline = WanVideoPipeline(components, args.device, offload_model=args.offload_model,
                                         memory_mode=args.memory_mode,
                                         vae_tiling=args.vae_tiling,
                                         teacache=teacache_from_args(args, settings.resolved(components.preset).sample_steps),
                                         cfg_skip_ratio=args.cfg_skip_ratio)
        self.settings = settings
        self.progress = progress

    def run(self, job, images, seed, writer):
        settings = SampleSettings(**{**vars(self.settings), "seed": seed})
        video = self.pipeline.generate(job.prompt, *images, settings=settings, progress=self.progress)
        frames, height, width = write_frames(writer, video)
        used = {"frames": frames, "height": height, "width": width, "cfg_skip_ratio": self.pipeline.cfg_skip_ratio,
                "memory_mode": self.pipeline.memory_mode,
                **vars(settings.resolved(self.pipeline.preset))}
        teacache = self.pipeline.teacache
        if teacache is not None:
            used.update(teacache_threshold=teacache.threshold, teacache_steps_run=sum(
                r["computed"] for r in teacache.trace if r["branch"] == "cond"))
            teacache.trace.clear()
        return used


def teacache_from_args(args, num_steps):
    """The `--teacache_*` cache (None when off); the pipeline resets it to each generation's step count."""
    if args.teacache_threshold <= 0:
        return None
    name = args.teacache_model or Path(args.checkpoint_dir).resolve().name
    try:
        coefficients = teacache_coefficients(name)
    except ValueError as err:
        raise InvalidInput(f"{err}; pass --teacache_model with the release name") from None
    return TeaCache(coefficients, num_steps=num_steps, threshold=args.teacache_threshold,
                    skip_start_steps=min(5, num_steps))


class ExtensionRunner:
    """An extension task's pipeline (see `pipelines.extensions.ExtensionTask.load`)."""

    def __init__(self, pipeline, settings):
        self.pipeline = pipeline
        self.settings = settings

    def run(self, job, images, seed, writer):
        return self.pipeline.run(job, SampleSettings(**{**vars(self.settings), "seed": seed}), seed, writer)


class CausalRunner:
    """Block-by-block streaming generation with a causal (Self-Forcing / CausVid) model."""

    def __init__(self, components, args, settings, config, progress=True):
        self.components = components
        self.preset = components.preset
        self.config = config
        self.causal = causal_model_from_config(components.dit, config)
        self.pipeline = pipeline_from_config(self.causal, config)
        self.num_frames = args.num_output_frames or config.get("num_output_frames", 21)
        self.size = settings.size or config.get("size") or self.preset.sizes[0]
        self.negative_prompt = settings.negative_prompt or config.get("negative_prompt", self.preset.negative_prompt)
        self.device = torch.device(args.device)
        self.tiling = args.vae_tiling
        self.progress = progress

    def run(self, job, images, seed, writer):
        vae, encoder = self.components.vae, self.components.text_encoder
        width, height = (int(v) for v in self.size.split("*"))
        latent_size = (height // vae.spatial_stride, width // vae.spatial_stride)
        context, negative = encoder.encode([job.prompt, self.negative_prompt], device=self.device)
        prefix = None
        if images:
            if not self.causal.independent_first_frame:
                raise InvalidInput("an image prompt needs a config with independent_first_frame: true")
            pixels = resize_cover(images[0].float(), width, height)[None, :, None]
            prefix = vae.encode(pixels.to(vae.conv2.weight.device)).to(self.device)
        generator = torch.Generator(self.device).manual_seed(seed)
        stream = self.pipeline.stream_video(vae, [context], self.num_frames, latent_size, negative_context=[negative],
                                            prefix=prefix, generator=generator, tiled=self.tiling)
        blocks = len(self.causal.block_sizes(self.num_frames))
        frames = sum(write_frames(writer, pixels[0])[0] for pixels in tqdm(stream, total=blocks, desc="blocks",
                                                                            leave=False, disable=not self.progress))
        settings = {k: self.config.get(k) for k in ("denoising_step_list", "num_frame_per_block",
                                                    "independent_first_frame", "context_noise", "model_kwargs")}
        return {**settings, "frames": frames, "height": height, "width": width, "size": self.size,
                "num_output_frames": self.num_frames, "seed": seed, "negative_prompt": self.negative_prompt}


def parallel_options(args):
    return ParallelOptions(args.ulysses_size, args.dit_fsdp, args.t5_fsdp)


def validate(args):
    """Everything that can be checked without loading weights. Returns (preset, config, settings, fps, jobs,
    loras); the preset of an extension task is its `ExtensionTask`."""
    config = read_config(args.config_path)
    extension = extension_tasks().get(args.task)
    # An extension task's own options (those in its `defaults`) pass through to its pipeline.
    options = {k: config.pop(k) for k in list(config) if extension is not None and k in extension.defaults
               and k not in SETTING_KEYS + ("fps",)}
    settings, fps = merged_settings(args, config)
    config.update(options)
    if (extension is not None or is_causal(config)) and (args.teacache_threshold or args.cfg_skip_ratio):
        raise InvalidInput(f"--teacache_threshold / --cfg_skip_ratio apply to the bidirectional core tasks; "
                           f"{'extension tasks with TeaCache (fun-*) take them as YAML options' if extension else 'causal configs have no CFG steps to skip'}")
    if extension is not None:
        if args.ulysses_size > 1 or args.dit_fsdp or args.t5_fsdp or launched_processes() > 1:
            raise InvalidInput(f"task {args.task} runs in one process; drop torchrun and the parallel options")
        if args.memory_mode:
            raise InvalidInput(f"--memory_mode applies to the core tasks; task {args.task} takes the YAML option "
                               f"GPU_memory_mode where it supports one (fun-*)")
        if not Path(args.checkpoint_dir).is_dir():
            raise CheckpointError(f"checkpoint folder not found: {args.checkpoint_dir}")
        extension.check_folder(Path(args.checkpoint_dir))
        loras = [parse_lora(spec) for spec in args.lora]
        return extension, config, settings, fps, read_extension_prompt_file(args.data_path, extension), loras
    check_parallel(parallel_options(args), launched_processes(), is_causal(config), args.offload_model, args.t5_cpu)
    check_memory_mode(args, is_causal(config))
    preset = check_folder(args.checkpoint_dir, args.task)
    loras = [parse_lora(spec) for spec in args.lora]
    dit_checkpoint = args.dit_checkpoint or config.get("generator_ckpt")
    if dit_checkpoint:
        trained_dit_weights(dit_checkpoint, args.use_ema or config.get("use_ema", False))
    if is_causal(config):
        check_size(preset, settings.size or config.get("size") or preset.sizes[0])
        check_positive("num_output_frames", args.num_output_frames or config.get("num_output_frames", 21))
        jobs = read_prompt_file(args.data_path, "causal")
    else:
        if not 0 <= args.cfg_skip_ratio <= 1:
            raise InvalidInput(f"--cfg_skip_ratio must be in [0, 1], got {args.cfg_skip_ratio}")
        teacache_from_args(args, settings.resolved(preset).sample_steps)
        jobs = read_prompt_file(args.data_path, preset.task)
    return preset, config, settings, fps, jobs, loras


def check_memory_mode(args, causal):
    if not args.memory_mode:
        return
    if args.offload_model:
        raise InvalidInput("--memory_mode and --offload_model both decide where the DiT lives; drop --offload_model "
                           "(--memory_mode model_cpu_offload is its per-forward equivalent)")
    if causal:
        raise InvalidInput("--memory_mode applies to the bidirectional core tasks, not to causal configs")
    if launched_processes() > 1 or args.ulysses_size > 1 or args.dit_fsdp:
        raise InvalidInput("--memory_mode runs in one process; drop torchrun, --ulysses_size and --dit_fsdp")


def fuse_loras(modules, loras):
    for path, scale in loras:
        for module in modules:
            with torch.no_grad():
                fuse_lora(module, path, scale)
        log.info("fused LoRA %s (scale %s)", path, scale)


def load(args, preset, config, loras):
    """The checkpoint folder's components (an extension task: its pipeline), with trained DiT weights
    and LoRAs applied."""
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if isinstance(preset, ExtensionTask):
        pipeline = preset.load(Path(args.checkpoint_dir), args, config)
        fuse_loras(pipeline.dits, loras)
        apply_memory_modes(pipeline.dits, getattr(pipeline, "memory_mode", None), args.device)
        apply_cpu_linears(pipeline.dits, args.device)
        return pipeline
    components = load_components(args.checkpoint_dir, args.task, dtype=dtype, device=args.device,
                                 t5_cpu=args.t5_cpu, offload_model=args.offload_model)
    dit_checkpoint = args.dit_checkpoint or config.get("generator_ckpt")
    if dit_checkpoint:
        replace_dit_weights(components, dit_checkpoint, args.use_ema or config.get("use_ema", False), dtype)
        log.info("DiT weights from %s", dit_checkpoint)
    experts = [components.dit.high_noise_model, components.dit.low_noise_model] if preset.is_moe \
        else [components.dit]
    fuse_loras(experts, loras)
    apply_memory_modes(experts, args.memory_mode, args.device)
    apply_cpu_linears(experts, args.device)
    return components


def apply_memory_modes(dits, mode, device):
    """The GPU memory mode on each DiT (expert), after the LoRA fusion: merging a LoRA into fp8 weights
    would add their rounding error to the update (VideoX-Fun quantizes first and drifts)."""
    if mode:
        for dit in dits:
            apply_memory_mode(dit, mode, device)
        log.info("DiT memory mode %s", mode)


def apply_cpu_linears(dits, device):
    """On the CPU, the DiTs' fp32 linears through oneDNN (`wan.onednn_linear`: 1.5-1.8x MKL's speed on
    AMD CPUs), after the memory modes (fp8 linears stay as they are)."""
    if torch.device(device).type == "cpu":
        switched = sum(use_onednn_linears(dit) for dit in dits)
        log.info("CPU: %d DiT linear layers run through oneDNN", switched)


class DiscardWriter:
    """The video writer of ranks other than 0: they make the same frames, rank 0 writes them."""

    def append_data(self, frame):
        pass


class TeeWriter:
    """A video writer that also hands every frame to `on_frame` as it is written (app.py streams them)."""

    def __init__(self, writer, on_frame):
        self.writer = writer
        self.on_frame = on_frame

    def append_data(self, frame):
        self.writer.append_data(frame)
        self.on_frame(frame)


def generate_all(args, is_main, preset, config, settings, fps, jobs, loras, components, on_frame=None):
    """Writes one mp4 + JSON sidecar per job; `on_frame(uint8 [H, W, 3])` also sees every frame as written."""
    if isinstance(preset, ExtensionTask):
        runner = ExtensionRunner(components, settings)
    elif is_causal(config):
        runner = CausalRunner(components, args, settings, config, progress=is_main)
    else:
        runner = BidirectionalRunner(components, args, settings, progress=is_main)
    fps = fps or preset.fps
    out_dir = Path(args.output_folder)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    base_seed = settings.seed or 0
    dit_checkpoint = args.dit_checkpoint or config.get("generator_ckpt")
    parallel = {"processes": launched_processes(), **asdict(parallel_options(args))}
    for index, job in enumerate(tqdm(jobs, desc="prompts", disable=not is_main)):
        images = [image_to_tensor(check_image_file(p)) for p in job.images]
        stem = output_stem(index, job.prompt)
        tmp = out_dir / f".{stem}.tmp.mp4"
        with video_writer(tmp, fps) if is_main else nullcontext(DiscardWriter()) as writer:
            used = runner.run(job, images, base_seed + index, TeeWriter(writer, on_frame) if on_frame else writer)
        if not is_main:
            continue
        if used.get("audio_track"):  # audio-driven tasks: their input audio goes into the mp4
            mux_audio(tmp, used["audio_track"])
        os.replace(tmp, out_dir / f"{stem}.mp4")
        sidecar = {"prompt": job.prompt, "images": [str(p) for p in job.images], "task": preset.name,
                   **({"inputs": {k: v and str(v) for k, v in job.inputs.items()}} if job.inputs else {}),
                   "checkpoint_dir": str(args.checkpoint_dir), "dit_checkpoint": dit_checkpoint,
                   "loras": [f"{p}:{s}" for p, s in loras], "fps": fps, "parallel": parallel, **used}
        (out_dir / f"{stem}.json").write_text(json.dumps(sidecar, indent=2, ensure_ascii=False, default=str))
        log.info("wrote %s (%d frames)", out_dir / f"{stem}.mp4", used["frames"])
    return 0


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        preset, config, settings, fps, jobs, loras = validate(args)
    except (InvalidInput, CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    parallel = parallel_options(args)
    env = init_parallel(parallel)
    is_main = env is None or env.is_main
    if env is not None:
        args.device = str(env.device)
        if not is_main:
            logging.getLogger().setLevel(logging.WARNING)
    try:
        components = load(args, preset, config, loras)
        try:
            if not isinstance(preset, ExtensionTask):
                parallelize(components, parallel)
        except ValueError as err:  # e.g. heads not divisible by the Ulysses degree
            print(f"error: {err}", file=sys.stderr)
            return 2
        return generate_all(args, is_main, preset, config, settings, fps, jobs, loras, components)
    finally:
        close_parallel(env)


if __name__ == "__main__":
    sys.exit(main())
