"""What each task adds to the DiT input besides the noisy latent (official image2video,
first_last_frame2video and textimage2video conventions)."""

import math

import torch
import torch.nn.functional as F


def image_latent_grid(image, area, vae_stride, patch_size):
    """Latent (h, w) for an image-conditioned video of about `area` pixels with the image's aspect
    ratio, rounded down to whole patches, as the official I2V does."""
    h, w = image.shape[1:]
    aspect = h / w
    lat_h = round(math.sqrt(area * aspect) // vae_stride[1] // patch_size[1] * patch_size[1])
    lat_w = round(math.sqrt(area / aspect) // vae_stride[2] // patch_size[2] * patch_size[2])
    return lat_h, lat_w


def known_frame_mask(frame_num, lat_h, lat_w, temporal_stride=4, last_known=False):
    """[4, F_lat, lat_h, lat_w] mask channels: 1 where the pixel frame is given (the first, and the
    last for FLF2V). Pixel frames fold into latent frames by 4, the first one repeated 4 times."""
    mask = torch.zeros(1, frame_num, lat_h, lat_w)
    mask[:, 0] = 1
    if last_known:
        mask[:, -1] = 1
    mask = torch.cat([mask[:, :1].repeat_interleave(temporal_stride, dim=1), mask[:, 1:]], dim=1)
    return mask.view(1, -1, temporal_stride, lat_h, lat_w).transpose(1, 2)[0]


@torch.no_grad()
def image_to_video_condition(vae, images, frame_num, lat_h, lat_w):
    """The `y` of Wan I2V / FLF2V: 4 mask channels + the VAE latents of the given frames with
    zeros elsewhere. images: [first] or [first, last], each [3, H, W] in [-1, 1].
    Returns [4 + z_dim, F_lat, lat_h, lat_w]."""
    h, w = lat_h * vae.spatial_stride, lat_w * vae.spatial_stride
    frames = [F.interpolate(img[None].float().cpu(), size=(h, w), mode="bicubic", align_corners=False)[0]
              for img in images]
    video = torch.zeros(3, frame_num, h, w)
    video[:, 0] = frames[0]
    if len(frames) == 2:
        video[:, -1] = frames[1]
    latents = vae.encode(video[None].to(vae.conv2.weight.device))[0]
    mask = known_frame_mask(frame_num, lat_h, lat_w, vae.temporal_stride, last_known=len(frames) == 2)
    return torch.cat([mask.to(latents), latents])


def first_frame_token_mask(num_frames, lat_h, lat_w, patch_size):
    """TI2V: [L] per-token factor, 0 for the tokens of the first latent frame (the clean image), else 1."""
    tokens_per_frame = (lat_h // patch_size[1]) * (lat_w // patch_size[2])
    mask = torch.ones(num_frames // patch_size[0], tokens_per_frame)
    mask[0] = 0
    return mask.flatten()
