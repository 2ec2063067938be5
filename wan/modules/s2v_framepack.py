"""FramePack motion tokens of Wan2.2 S2V: the latents of the frames generated before the current clip,
compressed more the older they are, with their RoPE positions at negative times.

The last 19 motion latent frames (zero-padded in front when fewer) split oldest -> newest into
16 / 2 / 1 frames, patchified by Conv3d (4, 8, 8) / (2, 4, 4) / (1, 2, 2). Sequence order: newest
(1 frame) | 2x | 4x. Their positions: times -1 | -3 | -19, -14, -9, -4, rows and columns spread over
the full-resolution token grid (as the official `rope_precompute` samples them).
"""

import numpy as np
import torch
import torch.nn as nn

# (frames, patch size) of each bucket, newest first.
BUCKETS = ((1, (1, 2, 2)), (2, (2, 4, 4)), (16, (4, 8, 8)))
MOTION_LATENT_FRAMES = sum(frames for frames, _ in BUCKETS)


def _linspace_int(first, last, count):
    """`count` positions from `first` to `last`, truncated to integers as the official numpy code does."""
    return torch.from_numpy(np.linspace(first, last, count).astype(np.int64))


def bucket_positions(start_time, frames, grid, full_grid):
    """[f*h*w, 3] positions of one bucket's tokens: a (f, h, w) token grid spread over the `frames`
    latent frames from `start_time` (negative) on and over the full-resolution token grid (H, W)."""
    f, h, w = grid
    # Upstream samples |time| from -start_time down to -(start_time + frames - 1), then negates it.
    times = -_linspace_int(-start_time, -(start_time + frames - 1), f)
    rows, cols = _linspace_int(0, full_grid[0] - 1, h), _linspace_int(0, full_grid[1] - 1, w)
    return torch.stack(torch.meshgrid(times, rows, cols, indexing="ij"), dim=-1).reshape(-1, 3)


class FramePackMotioner(nn.Module):
    def __init__(self, dim, latent_dim=16):
        super().__init__()
        self.proj, self.proj_2x, self.proj_4x = (
            nn.Conv3d(latent_dim, dim, kernel_size=patch, stride=patch) for _, patch in BUCKETS)

    def forward(self, motion_latents):
        """motion_latents [B, C, T, H, W] -> (tokens [B, L, dim] fp32, positions [L, 3] long)."""
        b, c, t, height, width = motion_latents.shape
        padded = motion_latents.new_zeros(b, c, MOTION_LATENT_FRAMES, height, width)
        keep = min(t, MOTION_LATENT_FRAMES)
        if keep:
            padded[:, :, -keep:] = motion_latents[:, :, -keep:]
        # In time the buckets run oldest (16 frames) to newest (1 frame); the sequence takes them newest first.
        newest_first = padded.split([frames for frames, _ in BUCKETS][::-1], dim=2)[::-1]
        full_grid = (height // 2, width // 2)
        tokens, positions, start_time = [], [], 0
        for (frames, _), proj, latents in zip(BUCKETS, (self.proj, self.proj_2x, self.proj_4x), newest_first):
            out = proj(latents.to(proj.weight.dtype))
            start_time -= frames
            tokens.append(out.flatten(2).transpose(1, 2).float())
            positions.append(bucket_positions(start_time, frames, tuple(out.shape[2:]), full_grid))
        return torch.cat(tokens, dim=1), torch.cat(positions).to(motion_latents.device)
