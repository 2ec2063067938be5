"""Video generation from reference images (SkyReels-A2 and the A3 object / mask / background recipe).

The checkpoint is an A2 folder (diffusers layout: `transformer/`, `image_encoder/` a transformers
CLIPVisionModel, `vae/`, `text_encoder/`, `tokenizer/`) or any Wan2.1-I2V-14B folder; it loads as a
Wan2.1 i2v model (`pipelines.loading`). What makes it multi-reference is the input (see
`pipelines.references`): every reference's CLIP tokens, and the reference latent frames in `y`.

Differences from the reference pipeline, all fixes of its failures: one reference works (its mask
marks exactly the reference latent frames), prompts can be batched (each sample keeps its own
references, see `wan.modules.multiref`), and the noise comes from a CPU generator, so a seed gives
the same video on every device. The decoded reference frames are dropped from the output video.
"""

import logging
from dataclasses import replace

import torch

from wan.configs import get_preset
from wan.modules.multiref import MultiReferenceDiT, ReferenceTokens

from .guided_sampling import denoise
from .loading import load_components, resolve_preset
from .references import (A2_SLOTS, A3_SLOTS, clip_pixels, compact, encode_posterior, load_rgb,
                         reference_condition, reference_frame_count, vae_pixels)
from .validation import InvalidInput
from .video_io import write_frames
from .wan_video import SampleSettings

log = logging.getLogger(__name__)

A2_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
    "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, "
    "messy background, three legs, many people in the background, walking backwards")
# SkyReels-A2's infer.py: 480 x 832, 81 frames, 50 UniPC steps at flow shift 8, guidance 5.
A2_DEFAULTS = dict(size="832*480", frame_num=81, sample_steps=50, sample_shift=8.0, guide_scale=5.0,
                   sample_solver="unipc", negative_prompt=A2_NEGATIVE_PROMPT)
BASE_PRESET = "i2v-14B"


def a2_preset(folder):
    """The Wan2.1-I2V-14B preset with A2's defaults, then the folder's own `wan_config.json` overrides
    (tiny checkpoints declare their sizes, frame count and steps)."""
    _, extra = resolve_preset("i2v", folder)
    defaults = {**A2_DEFAULTS, "guide_scale": (A2_DEFAULTS["guide_scale"],) * 2}
    size = defaults.pop("size")
    preset = get_preset(BASE_PRESET)
    preset = preset.with_overrides(sizes=(size,) + tuple(s for s in preset.sizes if s != size), **defaults)
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in extra.get("overrides", {}).items()}
    return preset.with_overrides(**overrides)


class MultiReferencePipeline:
    """Generates videos from a prompt and reference images, one per slot (None where absent).

    slots: `A2_SLOTS` (packed: 1 to 3 references, no gaps) or `A3_SLOTS` (each slot keeps its latent
        frame; an absent one is an unknown frame and adds no CLIP tokens).
    """

    def __init__(self, components, slots, packed, device="cpu", preset=None):
        self.components = components
        self.preset = preset or components.preset
        self.slots = slots
        self.packed = packed
        self.device = torch.device(device)
        self.dit = MultiReferenceDiT(components.dit)

    @classmethod
    def from_folder(cls, folder, slots, packed, device="cpu", dtype=None):
        components = load_components(folder, "i2v", dtype=dtype, device=device)
        return cls(components, slots, packed, device, a2_preset(folder))

    @property
    def dits(self):
        return [self.components.dit]

    def check_references(self, references):
        if len(references) != len(self.slots):
            raise InvalidInput(f"expected {len(self.slots)} reference slots ({', '.join(s.name for s in self.slots)}), "
                               f"got {len(references)}")
        if references[0] is None:
            raise InvalidInput(f"the '{self.slots[0].name}' reference is required")

    @torch.no_grad()
    def encode_references(self, references, height, width):
        """references: uint8 [H, W, 3] or None per slot -> (CLIP tokens [n * 257, C] in slot order,
        VAE images per condition frame slot: [3, height, width] in [-1, 1] or None)."""
        self.check_references(references)
        clip = self.components.clip
        given = [(slot, image) for slot, image in zip(self.slots, references) if image is not None]
        pixels = torch.stack([clip_pixels(image, clip.model.image_size, slot.fill) for slot, image in given])
        tokens = clip.model(pixels.to(clip.device, clip.model.patch_embedding.weight.dtype)).float()
        images = [None if image is None else vae_pixels(image, height, width, slot)
                  for slot, image in zip(self.slots, references)]
        return tokens.flatten(0, 1), compact(images) if self.packed else images

    def condition(self, images, frame_num, generator):
        vae = self.components.vae
        return reference_condition(lambda video: encode_posterior(vae, video), images, frame_num, generator,
                                   vae.latents_mean, vae.latents_std, temporal_stride=vae.temporal_stride)

    @torch.no_grad()
    def generate(self, prompts, references, settings=None, progress=True):
        """prompts: B prompts; references: per prompt, one uint8 image or None per slot. Prompt i
        uses seed `settings.seed + i`. Returns B videos [3, F, H, W] in [-1, 1] (CPU, float32) without
        their reference frames."""
        if len(prompts) != len(references):
            raise InvalidInput(f"{len(prompts)} prompts but {len(references)} reference sets")
        if any(not p or not p.strip() for p in prompts):
            raise InvalidInput("a prompt is empty; give a description of the video")
        settings = (settings or SampleSettings()).resolved(self.preset)
        width, height = (int(v) for v in settings.size.split("*"))
        vae, batch = self.components.vae, len(prompts)
        encoded = [self.encode_references(r, height, width) for r in references]
        skipped = [reference_frame_count(len(images), temporal_stride=vae.temporal_stride) for _, images in encoded]
        needed = max(skipped)
        if settings.frame_num <= needed:
            raise InvalidInput(f"the reference slots take {needed} frames; frame_num must be larger "
                               f"(4n + 1), got {settings.frame_num}")
        latent_frames = (settings.frame_num - 1) // vae.temporal_stride + 1
        shape = (1, vae.z_dim, latent_frames, height // vae.spatial_stride, width // vae.spatial_stride)

        # Sample i draws its noise, then its posterior sample, from a CPU generator seeded with seed + i (the
        # reference's order): a batch gives the videos of separate runs, and a seed the same video on any device.
        generators = [torch.Generator().manual_seed(settings.seed + i) for i in range(batch)]
        latent = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(self.device)
        y = torch.stack([self.condition(images, settings.frame_num, g) for (_, images), g in zip(encoded, generators)])
        tokens = ReferenceTokens.from_list([t for t, _ in encoded]).to(self.device)
        text = self.components.text_encoder.encode(list(prompts) + [settings.negative_prompt] * batch,
                                                   device=self.device)
        y = y.to(self.device)

        def predict(latent, t):
            # classifier-free guidance: the negative prompt with the same references (as the reference)
            pred = self.dit(latent.repeat(2, 1, 1, 1, 1), t.expand(2 * batch), text, clip_fea=tokens.repeat(2),
                            y=y.repeat(2, 1, 1, 1, 1))
            return pred.chunk(2)

        self.components.dit.to(self.device)
        # the solvers used here are deterministic; a stochastic one would draw from prompt 0's generator
        latent = denoise(predict, latent, settings, self.preset.num_train_timesteps, generators[0], progress)
        video = vae.decode(latent.to(vae.device)).cpu()
        return [v[:, skip:] for v, skip in zip(video, skipped)]

    def run(self, job, settings, seed, writer):
        """One prompt-file job (see `pipelines.extensions.ExtensionTask.load`)."""
        references = [None if job.inputs[slot.name] is None else load_rgb(job.inputs[slot.name]) for slot in self.slots]
        settings = replace(settings, seed=seed)
        video = self.generate([job.prompt], [references], settings)[0]
        frames, height, width = write_frames(writer, video)
        return {"frames": frames, "height": height, "width": width,
                "references": [slot.name for slot, r in zip(self.slots, references) if r is not None],
                **vars(settings.resolved(self.preset))}


__all__ = ["A2_DEFAULTS", "A2_SLOTS", "A3_SLOTS", "MultiReferencePipeline", "a2_preset"]
