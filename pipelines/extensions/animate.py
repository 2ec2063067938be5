"""Wan2.2-Animate-14B task `animate`: a reference character driven by a preprocessed pose video and
face crops (animate mode), or put into a video in place of its person (replace mode).

Prompt-file lines: `ref_image<TAB>pose_video<TAB>face_video<TAB>bg_video<TAB>mask_video<TAB>prompt`.
The inputs are those of the official preprocessing (wan/modules/animate/preprocess; the detectors it
runs are out of scope here), videos as files or frame folders:
- ref_image: the character (`src_ref.png`), letterboxed on black to the video size;
- pose_video: the rendered skeleton video (`src_pose.mp4`); its size is the output size unless
  `--size` is given (then every video is scaled to cover it); its length is the output length;
- face_video: the face crops (`src_face.mp4`), one per frame, scaled to the model's face size (512);
- bg_video + mask_video (replace mode, both or neither): the video with the person removed
  (`src_bg.mp4`) and the person mask (`src_mask.mp4`, white = person).
Generation runs in clips of `frame_num` frames (4n+1, default 77) overlapping by `refert_num`
(YAML config, 1 or 5, default 1). Classifier-free guidance only when guide_scale > 1 (uncond: the
negative prompt and blank faces). `use_relighting_lora: true` (YAML) fuses the folder's
`relighting_lora.ckpt` (the release's, for replace mode). Defaults as the release: 20 steps,
shift 5, guide 1.0, 77 frames per clip, 30 fps.
"""

import logging
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from pipelines.animate_inputs import REFERT_NUMS, clip_condition, clip_starts, padded_length, pingpong_indices
from pipelines.guided_sampling import denoise
from pipelines.loading import (check_variant_folder, dit_weights, load_folder_clip, load_folder_text_encoder,
                               load_folder_vae, requested_dtype, resolve_preset, with_family_defaults)
from pipelines.tiny_checkpoint import TINY_DIT, make_tiny_checkpoint
from pipelines.validation import InvalidInput, check_image_file, parse_size
from pipelines.video_io import image_to_tensor, letterbox, read_video, to_unit, write_frames
from pipelines.wan_video import SampleSettings
from wan.checkpoint import CheckpointError, load_state_dict, read_state_dict
from wan.configs import get_preset
from wan.lora import fuse_lora
from wan.model_loading import read_dit_config, save_dit
from wan.modules.animate import WanAnimateModel

from . import ExtensionTask, register

log = logging.getLogger(__name__)

RELIGHTING_LORA = "relighting_lora.ckpt"
DEFAULTS = dict(sample_steps=20, sample_shift=5.0, guide_scale=1.0, frame_num=77, sample_solver="unipc",
                refert_num=1, use_relighting_lora=False)
PRESET_DEFAULTS = ("sample_steps", "sample_shift", "guide_scale", "frame_num", "sample_solver")


def animate_preset(folder):
    """The i2v-14B preset with Animate's defaults, then the folder's own overrides (tiny folders)."""
    preset, extra = resolve_preset("i2v", folder)
    preset = with_family_defaults(preset, folder, DEFAULTS, PRESET_DEFAULTS)
    return preset.with_overrides(name="animate-14B", fps=30), extra


def check_folder(folder):
    check_variant_folder(folder, "Wan2.2-Animate-14B", "config.json, DiT shards, VAE, umT5, CLIP",
                         "the Animate DiT config", animate_preset)


def load_animate_dit(folder, text_len, dtype, device, relighting_lora=False):
    weights = dit_weights(folder)
    with torch.device("meta"):
        model = WanAnimateModel.from_config({"text_len": text_len, **read_dit_config(folder)})
    load_state_dict(model, read_state_dict(weights), dtype=dtype, source=str(weights))
    log.info("loaded Animate DiT (%.2fB parameters) from %s", sum(p.numel() for p in model.parameters()) / 1e9,
             weights)
    if relighting_lora:
        path = Path(folder) / RELIGHTING_LORA
        if not path.exists():
            raise CheckpointError(f"use_relighting_lora is set but {path} is missing")
        names = fuse_lora(model, read_state_dict(path, nested_key="state_dict"))
        log.info("fused the relighting LoRA (%d modules) from %s", len(names), path)
    return model.to(device).eval().requires_grad_(False)


class AnimatePipeline:
    def __init__(self, preset, dit, vae, text_encoder, clip, device, refert_num=1):
        if refert_num not in REFERT_NUMS:
            raise InvalidInput(f"refert_num must be 1 or 5 (frames each clip takes from the previous one), "
                               f"got {refert_num}")
        self.preset = preset
        self.dit = dit
        self.dits = [dit]
        self.vae = vae
        self.text_encoder = text_encoder
        self.clip = clip
        self.device = torch.device(device)
        self.refert_num = refert_num

    def _settings(self, settings, pose_path):
        """Resolved settings; the size is --size, else the pose video's (multiples of 16)."""
        size = settings.size
        if size is None:
            first = read_video(pose_path, max_frames=1)
            size = f"{first.shape[3]}*{first.shape[2]}"
        width, height = parse_size(size)
        step = self.vae.spatial_stride * self.dit.patch_size[1]
        if width % step or height % step:
            raise InvalidInput(f"video size {size} (W*H) is not a multiple of {step}; pass --size, e.g. "
                               f"{width // step * step}*{height // step * step}")
        preset = self.preset.with_overrides(sizes=(size,))
        settings = SampleSettings(**{**vars(settings), "size": size}).resolved(preset)
        if settings.frame_num <= 2 * self.refert_num:
            raise InvalidInput(f"frame_num {settings.frame_num} (frames per clip) must exceed 2 x refert_num")
        return settings, width, height

    def _inputs(self, inputs, width, height):
        """Pose [3, T, H, W], faces [3, T, S, S], background (or None) and person mask [T, H, W] (or None)
        as uint8, the reference [3, H, W] in [-1, 1]."""
        if (inputs.get("bg_video") is None) != (inputs.get("mask_video") is None):
            raise InvalidInput("replace mode needs both bg_video and mask_video (animate mode: neither)")
        pose = read_video(inputs["pose_video"], width, height, uint8=True)
        face_size = self.dit.motion_encoder.size
        faces = read_video(inputs["face_video"], face_size, face_size, uint8=True)
        reference = letterbox(image_to_tensor(check_image_file(inputs["ref_image"])), width, height, fill=-1.0)
        background = mask = None
        if inputs.get("bg_video") is not None:
            background = read_video(inputs["bg_video"], width, height, uint8=True)
            mask = read_video(inputs["mask_video"], width, height, uint8=True)[0]
        lengths = {"face_video": faces.shape[1]}
        if background is not None:
            lengths.update(bg_video=background.shape[1], mask_video=mask.shape[0])
        short = {k: n for k, n in lengths.items() if n < pose.shape[1]}
        if short:
            raise InvalidInput(f"pose_video has {pose.shape[1]} frames but {short} fewer; "
                               f"the preprocessed videos must have one frame per pose frame")
        return pose, faces, reference, background, mask

    def _encode_reference(self, reference):
        """(y of the reference frame [20, 1, h, w]: ones mask + latent, CLIP tokens [1, 257, dim])."""
        latent = self.vae.encode(reference[None, :, None].to(self.vae.device))[0].float().cpu()
        y_ref = torch.cat([torch.ones(self.vae.temporal_stride, *latent.shape[1:]), latent])
        clip_fea = self.clip.encode([reference[:, None].to(self.clip.device)]).to(self.device)
        return y_ref, clip_fea

    def _predict(self, latent, t, text, inputs, guided):
        """(cond, uncond) noise predictions of one clip; uncond (the negative prompt, blank faces, the
        same pose and reference) only with guidance."""
        if not guided:
            return self.dit(latent[None], t, text, **inputs)[0], None
        batch = {k: v.expand(2, *v.shape[1:]) for k, v in inputs.items() if k != "face_pixel_values"}
        faces = inputs["face_pixel_values"]
        return self.dit(latent[None].expand(2, *latent.shape), t.expand(2), text, **batch,
                        face_pixel_values=torch.cat([faces, torch.full_like(faces, -1)])).unbind(0)

    @torch.no_grad()
    def generate(self, prompt, inputs, settings, progress=True):
        """Returns (video [3, T, H, W] in [-1, 1] on the CPU, T = the pose video's length, resolved settings)."""
        settings, width, height = self._settings(settings, inputs["pose_video"])
        pose, faces, reference, background, mask = self._inputs(inputs, width, height)
        length, clip_len, refert = pose.shape[1], settings.frame_num, self.refert_num
        order = pingpong_indices(length, padded_length(length, clip_len, refert))
        y_ref, clip_fea = self._encode_reference(reference)
        guided = settings.guide_scale[0] > 1
        prompts = [prompt, settings.negative_prompt] if guided else [prompt]
        text = self.text_encoder.encode(prompts, device=self.device)
        generator = torch.Generator().manual_seed(settings.seed)
        outputs, previous = [], None
        starts = clip_starts(len(order), clip_len, refert)
        for start in tqdm(starts, desc="clips", disable=not progress or len(starts) == 1, leave=False):
            frames = order[start:start + clip_len]
            cond_mask, cond_latents = clip_condition(
                self.vae, height, width, previous, None if background is None else to_unit(background[:, frames]),
                None if mask is None else mask[frames] / 255, clip_len, refert)
            y = torch.cat([y_ref, torch.cat([cond_mask, cond_latents])], dim=1)[None].to(self.device)
            pose_latents = self.vae.encode(to_unit(pose[None, :, frames]).to(self.vae.device)).to(self.device)
            clip_inputs = dict(y=y, clip_fea=clip_fea, pose_latents=pose_latents,
                               face_pixel_values=to_unit(faces[None, :, frames]).to(self.device))
            noise = torch.randn((16, *y.shape[2:]), generator=generator).to(self.device)
            predict = partial(self._predict, text=text, inputs=clip_inputs, guided=guided)
            latent = denoise(predict, noise, settings, self.preset.num_train_timesteps, generator, progress)
            video = self.vae.decode(latent[None, :, 1:].to(self.vae.device))[0].float().cpu()
            previous = video[:, -refert:]
            outputs.append(video if start == 0 else video[:, refert:])
        return torch.cat(outputs, dim=1)[:, :length], settings

    def run(self, job, settings, seed, writer):
        video, settings = self.generate(job.prompt, job.inputs, settings)
        frames, height, width = write_frames(writer, video)
        mode = "replace" if job.inputs.get("bg_video") is not None else "animate"
        return {"frames": frames, "height": height, "width": width, "mode": mode, "refert_num": self.refert_num,
                **vars(settings)}


def load(folder, args, config):
    preset, extra = animate_preset(folder)
    device = torch.device(args.device)
    dtype = requested_dtype(args.dtype, device)
    text_encoder = load_folder_text_encoder(folder, preset, extra, device, args.t5_cpu)
    clip = load_folder_clip(folder, preset, extra, device)
    vae = load_folder_vae(folder, preset, extra, device)
    dit = load_animate_dit(folder, preset.text_len, dtype, device, config.get("use_relighting_lora", False))
    return AnimatePipeline(preset, dit, vae, text_encoder, clip, device, config.get("refert_num", 1))


# Tiny widths of the face path (the release's: 512x512 faces, style 512, face encoder width 1024).
TINY_FACE = dict(face_size=16, face_channels={16: 8, 8: 16, 4: 16}, style_dim=32, face_encoder_width=8)
TINY_ANIMATE_OVERRIDES = dict(frame_num=5, sample_steps=2)


def make_tiny(folder, seed=0):
    """A tiny Wan2.2-Animate folder: the tiny i2v folder (CLIP included) with an Animate DiT of 5 layers."""
    folder = make_tiny_checkpoint("i2v", folder, seed, overrides=TINY_ANIMATE_OVERRIDES)
    config = {**get_preset("i2v-14B").dit, **TINY_DIT, "num_layers": 5, "model_type": "animate",
              "motion_encoder_dim": 512, **TINY_FACE}
    torch.manual_seed(seed)
    save_dit(folder, WanAnimateModel.from_config(config).state_dict(), config, "WanAnimateModel")
    return folder


register(ExtensionTask(
    name="animate", description="Wan2.2-Animate: a reference character driven by pose and face videos "
                                "(replace mode with bg_video + mask_video)",
    fields=("ref_image", "pose_video", "face_video", "bg_video", "mask_video"), optional=("bg_video", "mask_video"),
    file_kinds={"ref_image": "image", "pose_video": "video", "face_video": "video", "bg_video": "video",
                "mask_video": "video"},
    check_folder=check_folder, load=load, make_tiny=make_tiny, defaults=dict(DEFAULTS), fps=30))
