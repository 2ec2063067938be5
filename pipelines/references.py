"""Reference images of multi-reference composition (SkyReels-A2, A3): preprocessing and the DiT condition.

Each reference fills a slot. A2's slots are subject / object / background; A3's are object / mask
(an edge or placement image) / background, mask and background optional. A reference reaches the
DiT twice:
  - CLIP path: padded to a 512 x 512 square, resized to the encoder's size (224) with PIL bicubic,
    CLIP-normalized; its penultimate-block tokens (257 each) are concatenated in slot order.
  - VAE path: padded (subject, object, mask) or centre-cropped (background) to the video size, laid
    out on the time axis as pixel frames `[r0, r1 x4, r2 x4, zeros]` and encoded once; the 4 mask
    channels mark the reference latent frames as known, as Wan2.1 I2V's `y`.
Padding is white (255), as the reference does, except for masks: an edge image padded with white
would get solid false edges at its borders, so masks are padded black.

Images are uint8 HWC numpy arrays; resizing goes through Pillow, whose bicubic filter (with its
antialiasing on downscale) the reference uses, so the pixels match it exactly.
"""

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from wan.modules.clip import CLIP_MEAN, CLIP_STD
from wan.modules.vae_layers import conv3d, patchify

CLIP_PAD_SIZE = 512
WHITE, BLACK = 255, 0
LOGVAR_RANGE = (-30.0, 20.0)  # the clamp of diffusers' DiagonalGaussianDistribution


@dataclass(frozen=True)
class Slot:
    """One reference slot: its name, how its VAE image is fitted to the video ("pad" or "crop"), and the
    padding colour of both paths."""
    name: str
    fit: str = "pad"
    fill: int = WHITE


# Slot order is the order of the CLIP tokens and of the reference latent frames.
A2_SLOTS = (Slot("subject"), Slot("object"), Slot("background", fit="crop"))
A3_SLOTS = (Slot("object"), Slot("mask", fill=BLACK), Slot("background", fit="crop"))


def load_rgb(path):
    """An image file -> uint8 [H, W, 3] (grey and RGBA images converted to RGB, as the reference does)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def pil_resize(image, height, width, resample=Image.BICUBIC):
    """uint8 [H, W, 3] -> uint8 [height, width, 3] with Pillow's filter."""
    return np.asarray(Image.fromarray(image).resize((width, height), resample))


def pad_resize(image, height, width, fill=WHITE):
    """Pads to about the target aspect ratio (symmetric, truncated padding, as the reference's
    `_crop_and_resize_pad`), then resizes: uint8 [H, W, 3] -> [height, width, 3]."""
    ih, iw = image.shape[:2]
    if ih / iw < height / width:
        pad = int((height / width * iw - ih) / 2)
        image = np.pad(image, ((pad, pad), (0, 0), (0, 0)), constant_values=fill)
    else:
        pad = int((width / height * ih - iw) / 2)
        image = np.pad(image, ((0, 0), (pad, pad), (0, 0)), constant_values=fill)
    return pil_resize(image, height, width)


def crop_resize(image, height, width):
    """Centre-crops to the target aspect ratio (the reference's `_crop_and_resize`), then resizes."""
    ih, iw = image.shape[:2]
    if ih / iw < height / width:
        crop = int(ih / height * width)
        left = (iw - crop) // 2
        image = image[:, left:left + crop]
    else:
        crop = int(iw / width * height)
        top = (ih - crop) // 2
        image = image[top:top + crop]
    return pil_resize(np.ascontiguousarray(image), height, width)


def clip_pixels(image, size=224, fill=WHITE):
    """The CLIP input of a reference: pad to 512 x 512, PIL-bicubic resize to size x size, CLIP
    normalization. uint8 [H, W, 3] -> [3, size, size] fp32."""
    square = pad_resize(image, CLIP_PAD_SIZE, CLIP_PAD_SIZE, fill)
    pixels = torch.from_numpy(pil_resize(square, size, size).copy()).permute(2, 0, 1).float() / 255
    return (pixels - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def vae_pixels(image, height, width, slot):
    """The VAE input of a reference: fitted to the video size as its slot says. -> [3, H, W] in [-1, 1]."""
    fitted = crop_resize(image, height, width) if slot.fit == "crop" else pad_resize(image, height, width, slot.fill)
    return torch.from_numpy(fitted.copy()).permute(2, 0, 1).float() / 255 * 2 - 1


def reference_frames(num_slots, repeat=True, temporal_stride=4):
    """Pixel frame indices of each slot in the VAE clip: with `repeat`, slot 0 is frame 0 and slot
    i > 0 fills the 4 frames of latent frame i; without, slot i is frame i."""
    if not repeat:
        return [[i] for i in range(num_slots)]
    return [[0]] + [list(range(1 + temporal_stride * (i - 1), 1 + temporal_stride * i)) for i in range(1, num_slots)]


def reference_frame_count(num_slots, repeat=True, temporal_stride=4):
    """Pixel frames the slots take at the start of the clip (1, 5, 9 with `repeat`)."""
    return reference_frames(num_slots, repeat, temporal_stride)[-1][-1] + 1


def reference_video(references, num_frames, repeat=True, temporal_stride=4):
    """references: one [3, H, W] in [-1, 1] or None (absent) per slot, in slot order.
    Returns the pixel clip [3, num_frames, H, W] (zeros, i.e. mid-grey, where nothing is given) and
    the known-frame flags [num_frames]."""
    given = [r for r in references if r is not None]
    if not given:
        raise ValueError("at least one reference image is needed")
    frames = reference_frames(len(references), repeat, temporal_stride)
    if reference_frame_count(len(references), repeat, temporal_stride) > num_frames:
        raise ValueError(f"{len(references)} reference slots take {frames[-1][-1] + 1} frames; "
                         f"the video has only {num_frames} (use more frames)")
    video = torch.zeros(3, num_frames, *given[0].shape[1:])
    known = torch.zeros(num_frames)
    for reference, indices in zip(references, frames):
        if reference is not None:
            video[:, indices] = reference[:, None].float()
            known[indices] = 1
    return video, known


def latent_mask(known, lat_h, lat_w, temporal_stride=4):
    """Known-frame flags [N] -> the 4 mask channels [4, F_lat, lat_h, lat_w]: the first pixel frame is
    repeated 4 times, then every 4 pixel frames fold into one latent frame's channels."""
    flags = torch.cat([known[:1].repeat(temporal_stride), known[1:]])
    return flags.view(-1, temporal_stride).t()[:, :, None, None].expand(-1, -1, lat_h, lat_w).contiguous()


@torch.no_grad()
def encode_posterior(vae, video):
    """The posterior of a Wan VAE: video [B, 3, N, H, W] -> (mean, logvar) [B, z_dim, F, h, w], fp32 and
    unnormalized (the reference samples from it; `vae.encode` returns the normalized mean only)."""
    x = patchify(video.to(vae.device, vae.dtype), vae.patch_size)
    rest = x[:, :, 1:].split(vae.temporal_stride, dim=2) if x.shape[2] > 1 else ()
    cache = {}
    moments = [conv3d(vae.encoder(chunk, cache), vae.conv1.weight, vae.conv1.bias).float()
               for chunk in (x[:, :, :1], *rest)]
    return torch.cat(moments, dim=2).chunk(2, dim=1)


def sample_posterior(mean, logvar, generator):
    """mean + std * eps, eps drawn from `generator` (on the CPU, so the same on every device)."""
    std = torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE))
    eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
    return mean + std * eps


@torch.no_grad()
def reference_condition(encode, references, num_frames, generator, latents_mean, latents_std, repeat=True,
                        temporal_stride=4, sample=True):
    """The DiT condition `y` of the references: [4 + z_dim, F_lat, h, w].

    encode: video [1, 3, N, H, W] -> (mean, logvar) unnormalized (`encode_posterior` of a VAE).
    references: per slot a [3, H, W] image in [-1, 1], or None (unknown frames, mask 0).
    sample: draw the latents from the posterior with `generator` (the reference's
        `retrieve_latents(..., generator)`; call it right after drawing the initial noise to keep its
        random order), else take the mean (official Wan I2V).
    """
    video, known = reference_video(references, num_frames, repeat, temporal_stride)
    mean, logvar = encode(video[None])
    latents = sample_posterior(mean, logvar, generator) if sample else mean
    shape = (1, -1, 1, 1, 1)
    latents = (latents - latents_mean.view(shape).to(latents)) / latents_std.view(shape).to(latents)
    mask = latent_mask(known, *latents.shape[-2:], temporal_stride).to(latents)
    return torch.cat([mask, latents[0]])


def compact(references):
    """A2 packs the given references without gaps (1, 2 or 3 of them); A3 keeps each in its slot."""
    return [r for r in references if r is not None]
