"""The LIA motion encoder of Wan2.2-Animate: a face crop -> one 512-d motion vector.

A StyleGAN2-style appearance encoder (`enc.net_app`: 1x1 conv, residual blocks halving the size
down to 4x4, a 4x4 conv to `style_dim`), a plain chain of 5 equalized linears (`enc.fc`) to 20 motion
coefficients alpha, and a learned direction basis (`dec.direction`, [512, 20]): the motion is
alpha @ Q^T with Q the orthonormal factor of the basis (QR, fp32).

Equalized learning rate: weights are stored unscaled and scaled by 1 / sqrt(fan_in) at run time.
Module and parameter names are the official ones (the 4x4 blur kernels are buffers in the checkpoint).
Official sizes: 512x512 faces, channels {512: 32, 256: 64, 128: 128, 64: 256, 32..4: 512}, style 512.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

CHANNELS = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}
BLUR_TAPS = (1, 3, 3, 1)


def fused_leaky_relu(x, bias, negative_slope=0.2, scale=2 ** 0.5):
    return F.leaky_relu(x + bias, negative_slope) * scale


class FusedLeakyReLU(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x):
        return fused_leaky_relu(x, self.bias)


class Blur(nn.Module):
    """Pads by `pad` (before, after) on both spatial axes and filters with the normalized 4x4 kernel
    outer(taps, taps) (FIR, as upfirdn2d without resampling)."""

    def __init__(self, pad, taps=BLUR_TAPS):
        super().__init__()
        taps = torch.tensor(taps, dtype=torch.float32)
        kernel = taps[None, :] * taps[:, None]
        self.register_buffer("kernel", kernel / kernel.sum())
        self.pad = pad

    def forward(self, x):
        """x [N, C, H, W] -> [N, C, H + sum(pad) - 3, W + sum(pad) - 3]."""
        channels = x.shape[1]
        weight = self.kernel.flip(0, 1).to(x.dtype).expand(channels, 1, *self.kernel.shape)
        return F.conv2d(F.pad(x, [self.pad[0], self.pad[1], self.pad[0], self.pad[1]]), weight, groups=channels)


class EqualConv2d(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.scale = 1 / math.sqrt(in_channels * kernel_size ** 2)
        self.stride = stride
        self.padding = padding

    def forward(self, x):
        return F.conv2d(x, self.weight * self.scale, self.bias, stride=self.stride, padding=self.padding)


class EqualLinear(nn.Module):
    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim))
        self.bias = nn.Parameter(torch.zeros(out_dim))
        self.scale = 1 / math.sqrt(in_dim)

    def forward(self, x):
        return F.linear(x, self.weight * self.scale, self.bias)


def conv_layer(in_channels, out_channels, kernel_size, downsample=False, activate=True):
    """[Blur] -> EqualConv2d -> [FusedLeakyReLU] as an nn.Sequential (index names as the checkpoint).
    With an activation the conv has no bias (the activation's bias replaces it); without, no bias at all."""
    layers = []
    if downsample:
        p = len(BLUR_TAPS) - 2 + kernel_size - 1
        layers.append(Blur(((p + 1) // 2, p // 2)))
    layers.append(EqualConv2d(in_channels, out_channels, kernel_size, stride=2 if downsample else 1,
                              padding=0 if downsample else kernel_size // 2, bias=False))
    if activate:
        layers.append(FusedLeakyReLU(out_channels))
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    """[N, Cin, S, S] -> [N, Cout, S/2, S/2]: two convs (the second downsampling) + a 1x1 skip, / sqrt(2)."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv1 = conv_layer(in_channels, in_channels, 3)
        self.conv2 = conv_layer(in_channels, out_channels, 3, downsample=True)
        self.skip = conv_layer(in_channels, out_channels, 1, downsample=True, activate=False)

    def forward(self, x):
        return (self.conv2(self.conv1(x)) + self.skip(x)) / math.sqrt(2)


class AppearanceEncoder(nn.Module):
    """Face [N, 3, size, size] -> [N, style_dim]. `channels`: width at each resolution (see CHANNELS)."""

    def __init__(self, size, style_dim, channels):
        super().__init__()
        levels = int(math.log2(size))
        if 2 ** levels != size or size < 8:
            raise ValueError(f"face size must be a power of two >= 8, got {size}")
        self.size = size
        convs = [conv_layer(3, channels[size], 1)]
        for level in range(levels, 2, -1):
            convs.append(ResBlock(channels[2 ** level], channels[2 ** (level - 1)]))
        convs.append(EqualConv2d(channels[4], style_dim, 4, bias=False))
        self.convs = nn.ModuleList(convs)

    def forward(self, x):
        for conv in self.convs:
            x = conv(x)
        return x.flatten(1)


class MotionEncoderNet(nn.Module):
    """`enc`: appearance encoder + the linear chain to `motion_dim` coefficients."""

    def __init__(self, size, style_dim, motion_dim, channels):
        super().__init__()
        self.net_app = AppearanceEncoder(size, style_dim, channels)
        self.fc = nn.Sequential(*[EqualLinear(style_dim, style_dim) for _ in range(4)],
                                EqualLinear(style_dim, motion_dim))

    def forward(self, faces):
        return self.fc(self.net_app(faces))


class Direction(nn.Module):
    def __init__(self, motion_dim, out_dim=512):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, motion_dim))

    def forward(self, alpha):
        """alpha [N, motion_dim] -> [N, out_dim] = alpha @ Q^T, Q from the QR of the basis (fp32)."""
        q, _ = torch.linalg.qr(self.weight.float() + 1e-8)
        return alpha.float() @ q.T


class Synthesis(nn.Module):
    def __init__(self, motion_dim, out_dim=512):
        super().__init__()
        self.direction = Direction(motion_dim, out_dim)


class MotionEncoder(nn.Module):
    """Face crops [N, 3, size, size] in [-1, 1] -> motion vectors [N, 512] fp32 (key prefix `motion_encoder`)."""

    def __init__(self, size=512, style_dim=512, motion_dim=20, out_dim=512, channels=None):
        super().__init__()
        channels = CHANNELS if channels is None else {int(k): v for k, v in channels.items()}
        self.enc = MotionEncoderNet(size, style_dim, motion_dim, channels)
        self.dec = Synthesis(motion_dim, out_dim)

    @property
    def size(self):
        return self.enc.net_app.size

    def forward(self, faces, chunk=8):
        """Encodes `chunk` faces at a time (bounded memory at 512x512)."""
        if faces.ndim != 4 or faces.shape[1:] != (3, self.size, self.size):
            raise ValueError(f"face crops must be [N, 3, {self.size}, {self.size}], got {tuple(faces.shape)}; "
                             f"resize the face video to {self.size}x{self.size}")
        dtype = self.dec.direction.weight.dtype
        alpha = torch.cat([self.enc(part.to(dtype)) for part in faces.split(chunk)])
        return self.dec.direction(alpha)
