"""Wan2.2-Animate's long-video bookkeeping and per-clip condition (official animate.py conventions).

A video of any length is generated in clips of `clip_len` (4n+1) pixel frames that overlap by
`refert_num` (1 or 5) frames: the inputs are padded to a whole number of clips by running them
back and forth (ping-pong), each later clip is conditioned on the last `refert_num` frames of the
previous one, and the result is trimmed to the source length.
"""

import torch
import torch.nn.functional as F

REFERT_NUMS = (1, 5)


def padded_length(length, clip_len, refert_num):
    """The frame count >= length that splits into clips of clip_len overlapping by refert_num."""
    step = clip_len - refert_num
    return length + (-(length - refert_num)) % step


def pingpong_indices(length, target):
    """Frame indices 0, 1, ..., n-1, n-2, ..., 0, 1, ... of `target` entries (n = length)."""
    if length == 1:
        return [0] * target
    period = 2 * (length - 1)
    return [r if r < length else period - r for r in (i % period for i in range(target))]


def clip_starts(length, clip_len, refert_num):
    """Start frames of the clips covering `length` (already padded) frames."""
    return list(range(0, length - refert_num, clip_len - refert_num))


def fold_frame_mask(mask, temporal_stride=4):
    """Per-pixel-frame mask [T, h, w] (T = 4n+1) -> [4, n+1, h, w] condition channels: the first frame
    repeated 4 times, then every 4 frames folded into the channels (as the i2v mask)."""
    mask = torch.cat([mask[:1].repeat(temporal_stride, 1, 1), mask[1:]])
    return mask.unflatten(0, (-1, temporal_stride)).transpose(0, 1)


def clip_condition(vae, height, width, previous, background, person_mask, clip_len, refert_num):
    """The latent-frame condition of one clip: (mask [4, lat_t, h, w], latents [16, lat_t, h, w]).

    previous: the previous clip's last `refert_num` output frames [3, r, H, W], or None (first clip).
    background: [3, clip_len, H, W] (replace mode) or None (animate mode: zeros).
    person_mask: [clip_len, H, W] in [0, 1], 1 = the person to replace (replace mode) or None.
    The mask is 1 where the condition pixels are given: the previous frames, and in replace mode the
    background outside the person (nearest-downsampled to the latent grid).
    """
    h, w = height // vae.spatial_stride, width // vae.spatial_stride
    pixels = background.clone() if background is not None else torch.zeros(3, clip_len, height, width)
    if person_mask is not None:
        mask = F.interpolate((1 - person_mask)[:, None].float(), size=(h, w), mode="nearest")[:, 0]
    else:
        mask = torch.zeros(clip_len, h, w)
    if previous is not None:
        pixels[:, :refert_num] = previous
        mask[:refert_num] = 1
    latents = vae.encode(pixels[None].to(vae.device))[0].float().cpu()
    return fold_frame_mask(mask, vae.temporal_stride), latents
