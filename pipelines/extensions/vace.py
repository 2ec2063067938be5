"""Wan2.1-VACE 1.3B / 14B tasks: video editing with masks, reference-to-video, control, extension.

Task `vace`, prompt-file lines `src_video<TAB>src_mask<TAB>ref_images<TAB>prompt`, every field optional:
- src_video + src_mask: editing (inpainting, outpainting, masked extension): white mask pixels
  (> 0.5) are generated, black ones kept;
- src_video alone: the video is a control signal (depth, pose, scribbles ...), all generated;
- neither: text- or reference-to-video from `frame_num` blank frames;
- ref_images: one image, or a folder of images (file-name order), placed as reference frames.
Task `vace_extend`, lines `src_video<TAB>ref_images<TAB>prompt`: continues the video: its frames
(at most frame_num - 1) are kept and the rest of `frame_num` frames generated.
Videos are files or folders of frames (see `pipelines.video_io`), scaled to cover `--size` and
centre-cropped; the first frame_num frames are used (rounded down to 4n+1). Unlike the official
pipeline, a source video is not resampled over its whole duration. `context_scale` (YAML config,
default 1.0) weights the VACE hints. Defaults as the official generate.py: shift 16, 50 steps,
guide 5.0, 81 frames, 16 fps.
"""

import logging
from pathlib import Path

import torch

from pipelines.guided_sampling import denoise
from pipelines.loading import (check_variant_folder, dit_weights, load_folder_text_encoder, load_folder_vae,
                               requested_dtype, resolve_preset, with_family_defaults)
from pipelines.tiny_checkpoint import TINY_DIT, make_tiny_checkpoint
from pipelines.vace_context import vace_context
from pipelines.validation import InvalidInput, check_image_file, parse_size
from pipelines.video_io import frame_files, image_to_tensor, letterbox, read_video, usable_frames, write_frames
from wan.checkpoint import load_state_dict, read_state_dict
from wan.configs import get_preset
from wan.model_loading import read_dit_config, save_dit
from wan.modules.vace import VaceWanModel

from . import ExtensionTask, register

log = logging.getLogger(__name__)

# vace_layers of the releases by width (they live only in the checkpoint's config.json; the
# official default, every second layer, is wrong for 14B).
VACE_LAYERS = {1536: tuple(range(0, 30, 2)), 5120: tuple(range(0, 40, 5))}
VACE_SHIFT = 16.0
DEFAULTS = dict(sample_shift=VACE_SHIFT, sample_steps=50, guide_scale=5.0, frame_num=81, context_scale=1.0)


def vace_dit_config(config):
    """VaceWanModel arguments from an official VACE config.json, with the release's vace_layers when
    the file lacks them."""
    config = dict(config)
    if config.get("vace_layers") is None and config.get("dim") in VACE_LAYERS:
        config["vace_layers"] = list(VACE_LAYERS[config["dim"]])
    return config


def vace_preset(folder):
    """The t2v preset the folder's DiT width matches, with VACE's defaults and the folder's overrides."""
    preset, extra = resolve_preset("t2v", folder)
    preset = with_family_defaults(preset, folder, {"sample_shift": VACE_SHIFT}, ("sample_shift",))
    return preset.with_overrides(name=preset.name.replace("t2v", "vace")), extra


def check_folder(folder):
    check_variant_folder(folder, "Wan2.1-VACE", "config.json, diffusion_pytorch_model*.safetensors, VAE, umT5",
                         "the VACE DiT config with vace_layers", vace_preset)


def load_vace_dit(folder, text_len, dtype, device):
    weights = dit_weights(folder)
    config = vace_dit_config({"text_len": text_len, **read_dit_config(folder)})
    with torch.device("meta"):
        model = VaceWanModel.from_config(config)
    load_state_dict(model, read_state_dict(weights), dtype=dtype, source=str(weights))
    log.info("loaded VACE DiT (%.2fB parameters, vace_layers %s) from %s",
             sum(p.numel() for p in model.parameters()) / 1e9, list(model.vace_layers), weights)
    return model.to(device).eval().requires_grad_(False)


def reference_images(path, width, height):
    """[3, 1, height, width] per image of `path` (an image, or a folder of images in name order)."""
    if path is None:
        return []
    path = Path(path)
    files = frame_files(path, "reference folder") if path.is_dir() else [path]
    # Placed as the official pipeline does: fit inside the frame on a white canvas.
    return [letterbox(image_to_tensor(check_image_file(p)), width, height, fill=1.0)[:, None] for p in files]


def source_frames(inputs, width, height, frame_num, extend=False):
    """(frames [3, F, H, W] in [-1, 1], mask [1, F, H, W] in [0, 1], 1 = generate) of a prompt line."""
    video_path, mask_path = inputs.get("src_video"), inputs.get("src_mask")
    if video_path is None:
        if mask_path is not None:
            raise InvalidInput("src_mask was given without src_video; give the video the mask applies to")
        return torch.zeros(3, frame_num, height, width), torch.ones(1, frame_num, height, width)
    if extend:
        video = read_video(video_path, width, height, max_frames=frame_num - 1)
        kept = video.shape[1]
        frames = torch.cat([video, torch.zeros(3, frame_num - kept, height, width)], dim=1)
        mask = torch.cat([torch.zeros(1, kept, height, width), torch.ones(1, frame_num - kept, height, width)], dim=1)
        return frames, mask
    video = read_video(video_path, width, height, max_frames=frame_num)
    if mask_path is None:
        count = usable_frames(video.shape[1])
        return video[:, :count], torch.ones(1, count, height, width)
    mask = read_video(mask_path, width, height, max_frames=frame_num)
    count = usable_frames(min(video.shape[1], mask.shape[1]))
    if mask.shape[1] != video.shape[1]:
        log.warning("src_mask has %d frames, src_video %d: using the first %d", mask.shape[1], video.shape[1], count)
    return video[:, :count], ((mask[:1, :count] + 1) / 2).clamp(0, 1)


class VacePipeline:
    def __init__(self, preset, dit, vae, text_encoder, device, context_scale=1.0, extend=False):
        self.preset = preset
        self.dit = dit
        self.dits = [dit]
        self.vae = vae
        self.text_encoder = text_encoder
        self.device = torch.device(device)
        self.context_scale = float(context_scale)
        self.extend = extend

    @torch.no_grad()
    def generate(self, prompt, inputs, settings, progress=True):
        """Returns (video [3, F, H, W] in [-1, 1] on the CPU, resolved settings)."""
        settings = settings.resolved(self.preset)
        width, height = parse_size(settings.size)
        frames, mask = source_frames(inputs, width, height, settings.frame_num, self.extend)
        refs = reference_images(inputs.get("ref_images"), width, height)
        context = vace_context(self.vae, frames, mask, refs).to(self.device)[None]
        text = self.text_encoder.encode([prompt, settings.negative_prompt], device=self.device)
        generator = torch.Generator().manual_seed(settings.seed)
        noise = torch.randn((16, *context.shape[2:]), generator=generator).to(self.device)

        def predict(latent, t):  # the prompt and the negative prompt, the same VACE context
            return self.dit(latent[None].expand(2, *latent.shape), t.expand(2), text,
                            vace_context=context.expand(2, *context.shape[1:]),
                            context_scale=self.context_scale).unbind(0)

        latent = denoise(predict, noise, settings, self.preset.num_train_timesteps, generator, progress)
        video = self.vae.decode(latent[None, :, len(refs):].to(self.vae.device))[0].cpu()
        return video, settings

    def run(self, job, settings, seed, writer):
        video, settings = self.generate(job.prompt, job.inputs, settings)
        frames, height, width = write_frames(writer, video)
        return {"frames": frames, "height": height, "width": width, "context_scale": self.context_scale,
                **vars(settings)}


def load(folder, args, config, extend=False):
    preset, extra = vace_preset(folder)
    device = torch.device(args.device)
    dtype = requested_dtype(args.dtype, device)
    text_encoder = load_folder_text_encoder(folder, preset, extra, device, args.t5_cpu)
    vae = load_folder_vae(folder, preset, extra, device)
    dit = load_vace_dit(folder, preset.text_len, dtype, device)
    return VacePipeline(preset, dit, vae, text_encoder, device, config.get("context_scale", 1.0), extend)


# The VAE dominates a tiny run's time: the tiny VACE folder declares smaller sizes than the t2v one.
TINY_VACE_OVERRIDES = dict(sizes=["32*32", "64*32"], frame_num=5, sample_steps=2)


def make_tiny(folder, seed=0):
    """A tiny Wan2.1-VACE folder: the tiny t2v folder with a VACE DiT (hints after blocks 0 and 1)."""
    folder = make_tiny_checkpoint("t2v", folder, seed, overrides=TINY_VACE_OVERRIDES)
    config = {**get_preset("t2v-1.3B").dit, **TINY_DIT, "model_type": "vace", "vace_in_dim": 96,
              "vace_layers": [0, 1]}
    torch.manual_seed(seed)
    save_dit(folder, VaceWanModel.from_config(config).state_dict(), config, "VaceWanModel")
    return folder


register(ExtensionTask(
    name="vace", description="Wan2.1-VACE editing with video + mask, control video, reference-to-video",
    fields=("src_video", "src_mask", "ref_images"), optional=("src_video", "src_mask", "ref_images"),
    file_kinds={"src_video": "video", "src_mask": "video", "ref_images": "file"},
    check_folder=check_folder, load=load, make_tiny=make_tiny, defaults=dict(DEFAULTS), fps=16))

register(ExtensionTask(
    name="vace_extend", description="Wan2.1-VACE video extension: keeps the source frames, generates the rest",
    fields=("src_video", "ref_images"), optional=("ref_images",),
    file_kinds={"src_video": "video", "ref_images": "file"},
    check_folder=check_folder, load=lambda folder, args, config: load(folder, args, config, extend=True),
    make_tiny=None, defaults=dict(DEFAULTS), fps=16))
