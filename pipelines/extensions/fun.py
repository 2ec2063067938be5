"""Tasks of the VideoX-Fun models (see pipelines/fun.py and the README):

- `fun-inp`: `start_image<TAB>end_image<TAB>prompt`, both optional (none: text-to-video).
- `fun-control`: `control_video<TAB>start_image<TAB>ref_image<TAB>prompt`, the control video a canny,
  depth or pose rendering made beforehand (any RGB video); start and reference image optional (the
  reference needs a V1.1 / Wan2.2 Control model).
- `fun-camera`: `pose_file<TAB>start_image<TAB>prompt`, a CameraCtrl pose `.txt` (VideoX-Fun's
  `asset/*.txt`: a header line, then `frame fx fy cx cy 0 0 w2c(3x4)` per frame).

The checkpoint folder is a VideoX-Fun release (Wan2.1-Fun: the official Wan2.1 I2V layout;
Wan2.2-Fun A14B: `high_noise_model/` and `low_noise_model/`). Options (YAML `--config_path`):
`teacache_threshold` (0 = off; VideoX-Fun's scripts use 0.1), `teacache_skip_start_steps` (5),
`teacache_model` (the release name whose coefficients to use; default the folder's name),
`cfg_skip_ratio` (0 = off), `GPU_memory_mode` (VideoX-Fun's name; one of `wan.offload.MEMORY_MODES`,
applied to each DiT after the `--lora` fusion; default: the DiT stays on the device).
"""

import json
from pathlib import Path

import torch

from pipelines.fun import (FunInputs, FunPipeline, is_moe_folder, load_fun_components, mode_problem,
                           read_control_video)
from pipelines.loading import check_folder as check_wan_folder
from pipelines.loading import with_family_defaults
from pipelines.tiny_checkpoint import make_tiny_checkpoint
from pipelines.validation import check_image_file
from pipelines.video_io import image_to_tensor, write_frames
from wan.checkpoint import CheckpointError, save_state_dict
from wan.model_loading import read_dit_config
from wan.modules.fun import FunWanModel
from wan.offload import MEMORY_MODES
from wan.teacache import TeaCache, teacache_coefficients

from . import ExtensionTask, register

SETTING_FIELDS = ("frame_num", "sample_steps", "sample_shift", "guide_scale")
# VideoX-Fun's predict scripts: 81 frames at 16 fps, 50 steps, guidance 6.0, shift 5 (FACTS section 7).
FUN_DEFAULTS = dict(size="832*480", frame_num=81, sample_steps=50, sample_shift=5.0, guide_scale=6.0,
                    teacache_threshold=0.0, teacache_skip_start_steps=5, teacache_model=None, cfg_skip_ratio=0.0,
                    GPU_memory_mode=None)
# (mode, Wan2.2) -> (in_dim, FunWanModel extras) of the tiny checkpoints (V1.1 / Wan2.2-Fun layouts)
TINY_MODELS = {("inp", False): (36, {}), ("control", False): (48, {"add_ref_conv": True}),
               ("camera", False): (32, {"add_control_adapter": True}),
               ("inp", True): (36, {}), ("control", True): (52, {"add_ref_conv": True}),
               ("camera", True): (36, {"add_control_adapter": True})}


def check_folder(folder, mode):
    moe = is_moe_folder(folder)
    check_wan_folder(folder, "i2v-A14B" if moe else "i2v")
    dit_folder = Path(folder) / "low_noise_model" if moe else Path(folder)
    problem = mode_problem(read_dit_config(dit_folder) or {}, mode)
    if problem:
        raise CheckpointError(f"the DiT in {dit_folder} {problem}")


def fun_preset(components, options):
    """The folder's preset with the Fun defaults, except what its wan_config fixes (tiny sizes)."""
    return with_family_defaults(components.preset, components.folder, options, SETTING_FIELDS)


class FunTask:
    """The pipeline object inference.py drives for one Fun task."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.memory_mode = pipeline.memory_mode  # applied by inference.py after the LoRA fusion

    @property
    def dits(self):
        dit = self.pipeline.components.dit
        return [dit.high_noise_model, dit.low_noise_model] if self.pipeline.preset.is_moe else [dit]

    def run(self, job, settings, seed, writer):
        settings = settings.resolved(self.pipeline.preset)
        width, height = (int(v) for v in settings.size.split("*"))
        image = {name: image_to_tensor(check_image_file(path)) for name, path in job.inputs.items()
                 if path is not None and name.endswith("image")}
        control = job.inputs.get("control_video")
        control_video = None if control is None else read_control_video(control, width, height, settings.frame_num)
        inputs = FunInputs(start_image=image.get("start_image"), end_image=image.get("end_image"),
                           ref_image=image.get("ref_image"), pose_file=job.inputs.get("pose_file"),
                           control_video=control_video)
        video = self.pipeline.generate(job.prompt, inputs, settings=settings)
        frames, height, width = write_frames(writer, video)
        used = {**vars(settings), "frames": frames, "height": height, "width": width}
        if self.pipeline.teacache is not None:
            used["teacache_steps_run"] = sum(r["computed"] for r in self.pipeline.teacache.trace
                                             if r["branch"] == "cond")
            self.pipeline.teacache.trace.clear()
        return used


def load(folder, args, config, mode):
    options = {**FUN_DEFAULTS, **config}
    memory_mode = options["GPU_memory_mode"]
    if memory_mode is not None and memory_mode not in MEMORY_MODES:
        raise ValueError(f"GPU_memory_mode '{memory_mode}' is not one of {', '.join(MEMORY_MODES)}")
    if memory_mode is not None and args.offload_model:
        raise ValueError("GPU_memory_mode and --offload_model both decide where the DiT lives; drop --offload_model")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    components = load_fun_components(folder, dtype=dtype, device=args.device, t5_cpu=args.t5_cpu,
                                     offload_model=args.offload_model)
    components.preset = fun_preset(components, options)
    teacache = None
    if options["teacache_threshold"] > 0:
        teacache = TeaCache(teacache_coefficients(options["teacache_model"] or Path(folder).resolve().name),
                            num_steps=components.preset.sample_steps, threshold=options["teacache_threshold"],
                            skip_start_steps=options["teacache_skip_start_steps"])
    pipeline = FunPipeline(components, mode, args.device, offload_model=args.offload_model,
                           vae_tiling=args.vae_tiling, teacache=teacache, cfg_skip_ratio=options["cfg_skip_ratio"],
                           memory_mode=memory_mode)
    return FunTask(pipeline)


def make_tiny(folder, seed=0, mode="inp", wan22=False):
    """A tiny Wan2.1-Fun V1.1 folder of `mode` (official layout; random weights), or with `wan22` a
    Wan2.2-Fun A14B one (two experts, no CLIP)."""
    folder = Path(folder)
    make_tiny_checkpoint("i2v-A14B" if wan22 else "i2v", folder, seed)
    in_dim, extras = TINY_MODELS[mode, wan22]
    expert_dirs = [folder / "high_noise_model", folder / "low_noise_model"] if wan22 else [folder]
    for i, expert_dir in enumerate(expert_dirs):
        config = {**json.loads((expert_dir / "config.json").read_text()), "in_dim": in_dim, **extras,
                  "_class_name": "WanTransformer3DModel"}
        torch.manual_seed(seed + i)
        save_state_dict(FunWanModel.from_config(config).state_dict(),
                        expert_dir / "diffusion_pytorch_model.safetensors")
        (expert_dir / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def _register(mode, description, fields, optional, file_kinds):
    register(ExtensionTask(
        name=f"fun-{mode}", description=description, fields=fields, optional=optional, file_kinds=file_kinds,
        check_folder=lambda folder: check_folder(folder, mode),
        load=lambda folder, args, config: load(folder, args, config, mode),
        make_tiny=lambda folder, seed=0: make_tiny(folder, seed, mode), defaults=FUN_DEFAULTS))


_register("inp", "start/end-frame video inpainting (VideoX-Fun InP)", ("start_image", "end_image"),
          ("start_image", "end_image"), {})
_register("control", "video from a control video: canny, depth or pose renders (VideoX-Fun Control)",
          ("control_video", "start_image", "ref_image"), ("start_image", "ref_image"), {"control_video": "video"})
_register("camera", "camera-controlled video from a pose file (VideoX-Fun Control-Camera)",
          ("pose_file", "start_image"), ("start_image",), {"pose_file": "file"})
