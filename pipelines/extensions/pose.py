"""Tasks `pose` (UniAnimate-DiT on Wan2.1-I2V-14B, whole clip) and `pose-causal` (block-by-block
streaming with the causal model): prompt lines `ref_image<TAB>pose_video<TAB>prompt`, the pose video
a rendered pose mp4 or a folder of pose images (see pipelines/pose.py and the README).

The checkpoint folder is a Wan2.1 I2V (or, for `pose-causal`, T2V) folder holding the UniAnimate
weights too: every weight file whose name contains `unianimate` or `pose` (the release
`UniAnimate-Wan2.1-14B-Lora-12000.ckpt`, a trained `pose_proj` for a narrower DiT), or the files
listed in the config's `pose_weights`.
"""

from pathlib import Path

import torch

from pipelines.causal import causal_model_from_config
from pipelines.loading import load_components, replace_dit_weights, resolve_preset, with_family_defaults
from pipelines.loading import check_folder as check_wan_folder
from pipelines.pose import PosePipeline
from pipelines.tiny_checkpoint import make_tiny_checkpoint
from wan.checkpoint import WEIGHT_SUFFIXES, CheckpointError, save_state_dict
from wan.convert.unianimate import UNIANIMATE_LORA_TARGETS, load_unianimate, unianimate_state
from wan.lora import inject_lora
from wan.model_loading import load_dit, read_dit_config
from wan.modules.pose import PoseEncoder

from . import ExtensionTask, register

RELEASE_FILE = "UniAnimate-Wan2.1-14B-Lora-12000.ckpt"
TINY_POSE_FILE = "unianimate_tiny.safetensors"
SETTING_FIELDS = ("frame_num", "sample_steps", "sample_shift", "sample_solver", "guide_scale")
# The reference's inference example (portrait 832 high, 480 wide; Euler flow matching, shift 5, cfg 1.5).
POSE_DEFAULTS = dict(size="480*832", frame_num=81, sample_steps=50, sample_shift=5.0, sample_solver="euler",
                     guide_scale=1.5, pose_weights=None, pose_lora_scale=1.0)
CAUSAL_DEFAULTS = dict(POSE_DEFAULTS, num_frame_per_block=3, independent_first_frame=False, local_attn_size=-1,
                       sink_size=0, denoising_step_list=None, context_noise=0)


def dit_task(folder):
    """`i2v` for a DiT with condition channels (Wan2.1 I2V), else `t2v`."""
    config = read_dit_config(folder) or {}
    return "i2v" if config.get("in_dim", 16) != config.get("out_dim", 16) else "t2v"


def pose_weight_files(folder):
    return sorted(p for p in Path(folder).iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file()
                  and ("unianimate" in p.name.lower() or "pose" in p.name.lower()))


def check_folder(folder, causal=False):
    task = dit_task(folder)
    if task != "i2v" and not causal:
        raise CheckpointError(f"{folder} holds a T2V DiT; task pose runs UniAnimate on Wan2.1-I2V-14B "
                              f"(pose-causal also takes T2V models)")
    check_wan_folder(folder, task)
    if not pose_weight_files(folder):
        raise CheckpointError(f"no UniAnimate weights in {folder}: put {RELEASE_FILE} (ZheWang123/UniAnimate-DiT) "
                              f"there, or any weight file whose name contains 'unianimate' or 'pose'")


def pose_preset(folder, task, defaults):
    """The folder's preset with the pose defaults, except what the folder's wan_config fixes (tiny sizes)."""
    preset, _ = resolve_preset(task, folder)
    return with_family_defaults(preset, folder, defaults, SETTING_FIELDS)


def load(folder, args, config, causal=False):
    options = {**(CAUSAL_DEFAULTS if causal else POSE_DEFAULTS), **config}
    task = dit_task(folder)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    components = load_components(folder, task, dtype=dtype, device=args.device, t5_cpu=args.t5_cpu)
    components.preset = pose_preset(folder, task, options)
    if args.dit_checkpoint:
        replace_dit_weights(components, args.dit_checkpoint, args.use_ema, dtype)
    dit = components.dit
    encoder = PoseEncoder(dim=dit.dim, ref_channels=dit.in_dim - dit.out_dim)
    load_unianimate(dit, encoder, options["pose_weights"] or pose_weight_files(folder), options["pose_lora_scale"])
    encoder.to(args.device).eval().requires_grad_(False)
    if not causal:
        return PosePipeline(components, encoder, args.device, vae_tiling=args.vae_tiling)
    model = causal_model_from_config(dit, {
        "num_frame_per_block": options["num_frame_per_block"],
        "independent_first_frame": options["independent_first_frame"],
        "model_kwargs": {"local_attn_size": options["local_attn_size"], "sink_size": options["sink_size"]}})
    sampling = {k: options[k] for k in ("denoising_step_list", "context_noise") if options[k] is not None}
    return PosePipeline(components, encoder, args.device, model, sampling, vae_tiling=args.vae_tiling)


def make_tiny(folder, seed=0):
    """A tiny Wan2.1 I2V folder plus pose weights in the released layout (pose CNNs with the release's
    5120-wide tokens, a rank-4 LoRA with non-zero B) and the tiny DiT's pose_proj, all random."""
    folder = Path(folder)
    make_tiny_checkpoint("i2v", folder, seed)
    dit = load_dit(folder / "diffusion_pytorch_model.safetensors")
    torch.manual_seed(seed + 40)
    encoder = PoseEncoder(dim=dit.dim, ref_channels=dit.in_dim - dit.out_dim)
    inject_lora(dit, UNIANIMATE_LORA_TARGETS, rank=4)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.05)
        for conv in encoder.modules():
            if isinstance(conv, (torch.nn.Conv2d, torch.nn.Conv3d)):
                conv.weight.mul_(4)  # the default init is bias-dominated: no pose would get through the SiLUs
    save_state_dict(unianimate_state(encoder, dit), folder / TINY_POSE_FILE)
    return folder


register(ExtensionTask(
    name="pose", description="pose-driven animation of a reference image (UniAnimate-DiT, Wan2.1-I2V-14B)",
    fields=("ref_image", "pose_video"), file_kinds={"ref_image": "image", "pose_video": "video"},
    check_folder=check_folder, load=load, make_tiny=make_tiny, defaults=POSE_DEFAULTS))

register(ExtensionTask(
    name="pose-causal", description="pose-driven animation, streamed block by block with the causal model",
    fields=("ref_image", "pose_video"), file_kinds={"ref_image": "image", "pose_video": "video"},
    check_folder=lambda folder: check_folder(folder, causal=True),
    load=lambda folder, args, config: load(folder, args, config, causal=True), make_tiny=make_tiny,
    defaults=CAUSAL_DEFAULTS))
