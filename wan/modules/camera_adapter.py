"""The camera adapter of VideoX-Fun's Control-Camera models (`control_adapter.*` keys).

Plücker rays at pixel resolution, grouped 4 pixel frames per latent frame (24 channels), are folded
to the DiT's token grid: each latent frame is pixel-unshuffled by 8, projected by a 2x2 stride-2
convolution (the patch size) to the model width, and refined by residual 3x3 convolutions. The
result is added to the patch-embedded video tokens.
"""

import torch.nn as nn


class ResidualBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1)

    def forward(self, x):
        """x [N, C, H, W] -> [N, C, H, W]."""
        return x + self.conv2(self.conv1(x).relu())


class CameraAdapter(nn.Module):
    def __init__(self, in_dim, out_dim, patch_size=(2, 2), downscale_factor=8, num_residual_blocks=1):
        super().__init__()
        self.downscale_factor = downscale_factor
        self.conv = nn.Conv2d(in_dim * downscale_factor ** 2, out_dim, kernel_size=patch_size, stride=patch_size)
        self.residual_blocks = nn.Sequential(*[ResidualBlock(out_dim) for _ in range(num_residual_blocks)])

    def forward(self, x):
        """x [B, in_dim, F_lat, H_pix, W_pix] -> [B, out_dim, F_lat, H_pix / 16, W_pix / 16]
        (/ 8 * patch size)."""
        b, c, f, h, w = x.shape
        if h % self.downscale_factor or w % self.downscale_factor:
            raise ValueError(f"camera input {h}x{w} is not divisible by {self.downscale_factor}")
        frames = x.transpose(1, 2).reshape(b * f, c, h, w)
        frames = nn.functional.pixel_unshuffle(frames, self.downscale_factor)
        out = self.residual_blocks(self.conv(frames))
        return out.unflatten(0, (b, f)).transpose(1, 2)
