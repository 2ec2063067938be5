"""Batch video generation from a prompt file with any Wan checkpoint folder.

    python inference.py --task t2v --checkpoint_dir Wan2.1-T2V-1.3B --data_path prompts/t2v_examples.txt \
        --output_folder outputs/ [--config_path configs/x.yaml] [--size 832*480] [--frame_num 81] \
        [--sample_steps 50] [--seed 0]

Settings come from the task's preset, then the YAML config, then the command line. Every input is
checked before any weights are loaded. Each prompt gives `NNN_<words>.mp4` and a JSON sidecar.
"""

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from pipelines.loading import TASK_PRESETS, check_folder, load_components
from pipelines.prompt_file import read_prompt_file
from pipelines.validation import InvalidInput, check_image_file
from pipelines.video_io import image_to_tensor, save_video
from pipelines.wan_video import SampleSettings, WanVideoPipeline
from wan.checkpoint import CheckpointError

log = logging.getLogger("inference")

SETTING_KEYS = ("size", "frame_num", "sample_steps", "sample_shift", "sample_solver", "guide_scale",
                "negative_prompt", "seed")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=sorted(TASK_PRESETS))
    parser.add_argument("--checkpoint_dir", required=True)
    parser.add_argument("--data_path", required=True, help="prompt file (see pipelines/prompt_file.py)")
    parser.add_argument("--output_folder", required=True)
    parser.add_argument("--config_path", help="YAML with any of the settings below")
    parser.add_argument("--size", help="W*H as the official CLI, e.g. 832*480")
    parser.add_argument("--frame_num", type=int, help="4n+1 frames")
    parser.add_argument("--sample_steps", type=int)
    parser.add_argument("--sample_shift", type=float)
    parser.add_argument("--sample_solver", choices=["unipc", "dpm++", "euler"])
    parser.add_argument("--guide_scale", type=float, nargs="+", help="one value, or low-noise high-noise for A14B")
    parser.add_argument("--negative_prompt")
    parser.add_argument("--seed", type=int, help="base seed; prompt i uses seed + i")
    parser.add_argument("--fps", type=int, help="default: the preset's (16; 24 for TI2V-5B)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="DiT dtype")
    parser.add_argument("--offload_model", action="store_true", help="keep the DiT on the CPU when idle")
    parser.add_argument("--t5_cpu", action="store_true", help="run the text encoder on the CPU")
    parser.add_argument("--vae_tiling", action="store_true", help="decode in spatial tiles (bounded memory)")
    return parser.parse_args(argv)


def merged_settings(args):
    """Preset defaults < YAML config < command line."""
    values = {}
    if args.config_path:
        from omegaconf import OmegaConf

        if not Path(args.config_path).is_file():
            raise InvalidInput(f"config file not found: {args.config_path}")
        config = OmegaConf.to_container(OmegaConf.load(args.config_path))
        unknown = set(config) - set(SETTING_KEYS) - {"fps", "task"}
        if unknown:
            raise InvalidInput(f"{args.config_path}: unknown setting(s) {sorted(unknown)}; known: {SETTING_KEYS}")
        values.update(config)
    values.update({k: getattr(args, k) for k in SETTING_KEYS + ("fps",) if getattr(args, k) is not None})
    guide = values.get("guide_scale")
    if isinstance(guide, (list, tuple)):
        values["guide_scale"] = guide[0] if len(guide) == 1 else tuple(guide)
    fps = values.pop("fps", None)
    return SampleSettings(**{k: v for k, v in values.items() if k in SETTING_KEYS}), fps


def output_stem(index, prompt):
    words = "_".join(re.findall(r"[A-Za-z0-9]+", prompt)[:6]) or "video"
    return f"{index:03d}_{words}"


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings, fps = merged_settings(args)
        preset = check_folder(args.checkpoint_dir, args.task)
        settings.resolved(preset)
        jobs = read_prompt_file(args.data_path, preset.task)
    except (InvalidInput, CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    dtype = getattr(torch, args.dtype) if args.dtype else None
    components = load_components(args.checkpoint_dir, args.task, dtype=dtype, device=args.device,
                                 t5_cpu=args.t5_cpu, offload_model=args.offload_model)
    pipeline = WanVideoPipeline(components, args.device, offload_model=args.offload_model, vae_tiling=args.vae_tiling)
    fps = fps or preset.fps
    out_dir = Path(args.output_folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_seed = settings.seed or 0
    for index, job in enumerate(tqdm(jobs, desc="prompts")):
        images = [image_to_tensor(check_image_file(p)) for p in job.images]
        job_settings = SampleSettings(**{**vars(settings), "seed": base_seed + index})
        video = pipeline.generate(job.prompt, *images, settings=job_settings)
        stem = output_stem(index, job.prompt)
        tmp = out_dir / f".{stem}.tmp.mp4"
        save_video(video, tmp, fps=fps)
        os.replace(tmp, out_dir / f"{stem}.mp4")
        resolved = job_settings.resolved(preset)
        sidecar = {"prompt": job.prompt, "images": [str(p) for p in job.images], "task": preset.name,
                   "checkpoint_dir": str(args.checkpoint_dir), "fps": fps, "frames": video.shape[1],
                   "height": video.shape[2], "width": video.shape[3], **vars(resolved)}
        (out_dir / f"{stem}.json").write_text(json.dumps(sidecar, indent=2, ensure_ascii=False))
        log.info("wrote %s", out_dir / f"{stem}.mp4")
    return 0


if __name__ == "__main__":
    sys.exit(main())
