"""VideoX-Fun generation: start/end-frame inpainting (InP), control videos (Control, V1.1 with a
reference image) and camera trajectories (Control-Camera), Wan2.1-Fun and Wan2.2-Fun A14B.

The condition channels `y` each model was trained with (FACTS of ext/fun, section 3):
- InP: [4 mask channels (1 = known frame), 16 latents of the video with unknown frames zeroed];
  no image at all gives zeros (text-to-video).
- Wan2.1 Control: [16 control-video latents, 16 start-image latents in latent frame 0, zeros after];
  Wan2.2 Control: [16 control latents, then the InP channels]. `full_ref` (ref_conv models): the
  reference image's latent, zeros without one.
- Wan2.1 Camera: [16 start-image latents]; Wan2.2 Camera: the InP channels; `y_camera` from the pose
  file (`wan.camera`).
Wan2.1-Fun models also take CLIP features of the reference (else start) image; without an image,
the features of a black image zeroed, as VideoX-Fun feeds them.

Sampling is `WanVideoPipeline`'s (any solver, MoE switching, TeaCache, cfg_skip_ratio); the `image`
argument of its `generate` carries a `FunInputs` here.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from wan.camera import pose_file_condition
from wan.checkpoint import CheckpointError, load_state_dict, read_state_dict
from wan.convert.dit_diffusers import is_diffusers_dit
from wan.model_loading import read_dit_config
from wan.modules.fun import FunWanModel
from wan.modules.moe import WanMoE

from .conditioning import image_to_video_condition
from .loading import (WanComponents, default_dtype, dit_folders, dit_weights, load_folder_clip,
                      load_folder_text_encoder, load_folder_vae, resolve_preset)
from .validation import InvalidInput
from .video_io import read_video, resize_cover, usable_frames
from .wan_video import WanVideoPipeline

log = logging.getLogger(__name__)

MODES = ("inp", "control", "camera")


@dataclass
class FunInputs:
    """A job's inputs: images [3, H, W] and control video [3, F, H, W] in [-1, 1], camera pose file."""
    start_image: torch.Tensor = None
    end_image: torch.Tensor = None
    ref_image: torch.Tensor = None
    control_video: torch.Tensor = None
    pose_file: Path = None


def widen_patch_embedding(state, in_dim):
    """A checkpoint's patch embedding with fewer input channels than the model (e.g. fine-tuning a
    Control model from T2V weights) fills the first channels, the rest zero (VideoX-Fun's loading)."""
    weight = state.get("patch_embedding.weight")
    if weight is not None and weight.shape[1] < in_dim:
        log.info("patch_embedding has %d input channels, the model %d: zero-filling the rest", weight.shape[1], in_dim)
        wide = weight.new_zeros(weight.shape[0], in_dim, *weight.shape[2:])
        wide[:, :weight.shape[1]] = weight
        state["patch_embedding.weight"] = wide
    return state


def load_fun_dit(folder, dtype=None, device="cpu"):
    """A FunWanModel from a VideoX-Fun DiT folder (`config.json` + weights); the optional modules
    (CLIP branch, ref_conv, control_adapter) are read off the checkpoint."""
    weights = dit_weights(folder)
    config = read_dit_config(folder)
    if config is None:
        raise CheckpointError(f"no config.json in {folder}")
    state = read_state_dict(weights)
    if is_diffusers_dit(state):
        raise CheckpointError(f"{weights} is in the diffusers layout; VideoX-Fun checkpoints use the official "
                              f"key names (convert with scripts/convert_checkpoint.py --to official)")
    config = {**config, "image_branch": any(k.startswith("img_emb.") for k in state),
              "add_ref_conv": "ref_conv.weight" in state,
              "add_control_adapter": any(k.startswith("control_adapter.") for k in state)}
    with torch.device("meta"):
        model = FunWanModel.from_config(config)
    load_state_dict(model, widen_patch_embedding(state, model.in_dim), dtype=dtype, source=str(weights))
    log.info("loaded Fun DiT (in_dim %d%s%s, %.2fB parameters) from %s", model.in_dim,
             ", ref_conv" if model.has_ref_conv else "", ", camera adapter" if model.has_control_adapter else "",
             sum(p.numel() for p in model.parameters()) / 1e9, weights)
    return model.to(device).eval().requires_grad_(False)


def is_moe_folder(folder):
    return (Path(folder) / "high_noise_model").is_dir()


def load_fun_components(folder, dtype=None, device="cpu", t5_cpu=False, offload_model=False):
    """Encoders, VAE and Fun DiT(s) of a Wan2.1-Fun folder (official Wan2.1 I2V layout) or a Wan2.2-Fun
    A14B folder (`high_noise_model/`, `low_noise_model/`)."""
    folder, device = Path(folder), torch.device(device)
    dtype = dtype or default_dtype(device)
    preset, extra = resolve_preset("i2v-A14B" if is_moe_folder(folder) else "i2v", folder)
    text_encoder = load_folder_text_encoder(folder, preset, extra, device, t5_cpu)
    dits = [load_fun_dit(f, dtype, "cpu" if offload_model else device) for f in dit_folders(folder, preset.is_moe)]
    if dits[0].image_branch != preset.use_clip:
        preset = preset.with_overrides(use_clip=dits[0].image_branch)
    clip = load_folder_clip(folder, preset, extra, device) if preset.use_clip else None
    vae = load_folder_vae(folder, preset, extra, device)
    dit = dits[0] if not preset.is_moe else WanMoE(dits[0], dits[1], boundary=preset.moe_boundary,
                                                   num_train_timesteps=preset.num_train_timesteps,
                                                   offload=offload_model, device=device)
    return WanComponents(preset, dit, vae, text_encoder, clip, folder)


def read_control_video(path, width, height, frame_num):
    """The first `frame_num` frames of a control video (file or frame folder), covered and centre-cropped
    to width x height: [3, F, height, width] in [-1, 1]."""
    video = read_video(path, width, height, max_frames=frame_num)
    if video.shape[1] < frame_num:
        raise InvalidInput(f"control video {path} has {video.shape[1]} frames, fewer than frame_num {frame_num}; "
                           f"pass --frame_num {usable_frames(video.shape[1])} or a longer video")
    return video


def mode_problem(config, mode):
    """Why a DiT config (`config.json` keys) cannot run Fun `mode`, or None."""
    extra = config.get("in_dim", 16) - config.get("out_dim", 16)
    camera = bool(config.get("add_control_adapter"))
    expected = {"inp": (20,), "control": (32, 36), "camera": (16, 20)}[mode]
    if extra in expected and (mode == "camera") == camera:
        return None
    return (f"takes {extra} condition channels{' and camera rays' if camera else ''}: it is not a Fun {mode} model "
            f"(InP: 20 channels, Control: 32 or 36 (Wan2.2), Camera: 16 or 20 and a camera adapter)")


class FunPipeline(WanVideoPipeline):
    """`generate(prompt, inputs: FunInputs, settings=...)` for a Fun model of any mode."""

    def __init__(self, components, mode, device="cpu", **kwargs):
        if mode not in MODES:
            raise ValueError(f"unknown Fun mode '{mode}'; expected one of {MODES}")
        super().__init__(components, device, **kwargs)
        self.mode = mode
        dit = components.dit
        self.expert = dit.low_noise_model if isinstance(dit, WanMoE) else dit
        problem = mode_problem({"in_dim": self.expert.in_dim, "out_dim": self.expert.out_dim,
                                "add_control_adapter": self.expert.has_control_adapter}, mode)
        if problem:
            raise InvalidInput(f"the DiT in {components.folder} {problem}")

    def generate(self, prompt, inputs=None, settings=None, progress=True):
        return super().generate(prompt, inputs or FunInputs(), settings=settings, progress=progress)

    def _encode(self, video):
        """[3, F, H, W] pixels -> [z, F_lat, h, w] latents."""
        vae = self.components.vae
        return vae.encode(video[None].float().to(vae.conv2.weight.device))[0].to(self.device)

    def _inpaint_channels(self, image, end_image, frame_num, lat_h, lat_w, frames):
        """[4 mask + z] InP channels, zeros without images."""
        images = [img for img in (image, end_image) if img is not None]
        if end_image is not None and image is None:
            raise InvalidInput("an end image needs a start image")
        if not images:
            return torch.zeros(4 + self.components.vae.z_dim, frames, lat_h, lat_w, device=self.device)
        return image_to_video_condition(self.components.vae, images, frame_num, lat_h, lat_w).to(self.device)

    def _condition(self, settings, inputs, last_image=None):
        vae = self.components.vae
        width, height = (int(v) for v in settings.size.split("*"))
        frames = (settings.frame_num - 1) // vae.temporal_stride + 1
        lat_h, lat_w = height // vae.spatial_stride, width // vae.spatial_stride
        start = None if inputs.start_image is None else resize_cover(inputs.start_image.float(), width, height)
        end = None if inputs.end_image is None else resize_cover(inputs.end_image.float(), width, height)
        wan22 = not self.expert.image_branch
        kwargs = {}
        if self.mode == "inp":
            y = self._inpaint_channels(start, end, settings.frame_num, lat_h, lat_w, frames)
        else:
            if end is not None:
                raise InvalidInput(f"task fun-{self.mode} takes no end image")
            if wan22:
                part = self._inpaint_channels(start, None, settings.frame_num, lat_h, lat_w, frames)
            else:  # the start image encoded alone into latent frame 0
                part = torch.zeros(vae.z_dim, frames, lat_h, lat_w, device=self.device)
                if start is not None:
                    part[:, :1] = self._encode(start[:, None])
            if self.mode == "control":
                if inputs.control_video is None:
                    raise InvalidInput("task fun-control needs a control video (canny, depth or pose renders)")
                control = inputs.control_video.float()
                if control.shape[1] < settings.frame_num:
                    raise InvalidInput(f"the control video has {control.shape[1]} frames, fewer than frame_num "
                                       f"{settings.frame_num}")
                if tuple(control.shape[2:]) != (height, width):
                    control = torch.stack([resize_cover(f, width, height) for f in control.unbind(1)], dim=1)
                y = torch.cat([self._encode(control[:, :settings.frame_num]), part])
            else:
                if inputs.pose_file is None:
                    raise InvalidInput("task fun-camera needs a camera pose file")
                kwargs["y_camera"] = pose_file_condition(inputs.pose_file, width, height, settings.frame_num)[None]
                y = part
        kwargs["y"] = y[None]
        if inputs.ref_image is not None or self.expert.has_ref_conv:
            if not self.expert.has_ref_conv:
                raise InvalidInput("a reference image needs a model with ref_conv (Fun V1.1 / Wan2.2 Control)")
            ref = torch.zeros(vae.z_dim, lat_h, lat_w, device=self.device)
            if inputs.ref_image is not None:
                ref = self._encode(resize_cover(inputs.ref_image.float(), width, height)[:, None])[:, 0]
            kwargs["full_ref"] = ref[None]
        if self.expert.image_branch:
            kwargs["clip_fea"] = self._clip_features(inputs.ref_image if inputs.ref_image is not None else start)
        kwargs = {k: v.to(self.device) for k, v in kwargs.items()}
        return (vae.z_dim, frames, lat_h, lat_w), kwargs, None

    def _clip_features(self, image):
        clip = self.components.clip
        pixels = torch.zeros(3, 224, 224) if image is None else image.float()
        features = clip.encode([pixels[:, None].to(clip.device)])
        return features * 0 if image is None else features
