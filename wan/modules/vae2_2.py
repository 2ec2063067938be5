"""Wan2.2 VAE: causal 3D autoencoder, 48 latent channels, stride 4 x 16 x 16 (T x H x W).

Compared with Wan2.1: the pixels are folded 2 x 2 into channels before the encoder (and unfolded
after the decoder), the decoder is wider than the encoder (`dec_dim`), and each resolution level is
one block whose resampling path has a parameter-free shortcut (average / duplicate) around it.
Checkpoint: `Wan2.2_VAE.pth` (a plain state dict with the official key names, which ours equal).
"""

import torch.nn as nn
import torch.nn.functional as F

from wan.modules.vae_layers import (Causal, CausalSequential, CausalVideoVAE, Resample, ResidualBlock, decoder3d,
                                    encoder3d)

PATCH_SIZE = 2

LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667)
LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)


class AvgDown3D(nn.Module):
    """Parameter-free downsampling shortcut: folds each ft x fs x fs block into channels, then averages
    consecutive groups of those channels down to `out_channels`. A chunk whose length is not a multiple
    of ft (the first frame of a video) is padded with zero frames in front.
    x: [B, C, T, H, W] -> [B, out_channels, ceil(T/ft), H/fs, W/fs]
    """

    def __init__(self, out_channels, factor_t, factor_s):
        super().__init__()
        self.out_channels, self.factor_t, self.factor_s = out_channels, factor_t, factor_s

    def forward(self, x):
        ft, fs = self.factor_t, self.factor_s
        x = F.pad(x, (0, 0, 0, 0, -x.shape[2] % ft, 0))
        b, c, t, h, w = x.shape
        x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        return x.reshape(b, self.out_channels, -1, t // ft, h // fs, w // fs).mean(dim=2)


class DupUp3D(nn.Module):
    """Parameter-free upsampling shortcut, the mirror of `AvgDown3D`: repeats each channel, then unfolds
    channels into ft x fs x fs blocks. At the start of a video the first ft-1 frames are dropped, as
    the main path turns the first frame into one frame.
    x: [B, C, T, H, W] -> [B, out_channels, T*ft (minus ft-1 at the start), H*fs, W*fs]
    """

    def __init__(self, in_channels, out_channels, factor_t, factor_s):
        super().__init__()
        self.out_channels, self.factor_t, self.factor_s = out_channels, factor_t, factor_s
        self.repeats = out_channels * factor_t * factor_s * factor_s // in_channels

    def forward(self, x, starts_video):
        ft, fs = self.factor_t, self.factor_s
        b, _, t, h, w = x.shape
        x = x.repeat_interleave(self.repeats, dim=1).view(b, self.out_channels, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, self.out_channels, t * ft, h * fs, w * fs)
        return x[:, :, ft - 1:] if starts_video else x


def _res_blocks(in_dim, out_dim, count, dropout):
    return [ResidualBlock(in_dim if i == 0 else out_dim, out_dim, dropout) for i in range(count)]


class Down_ResidualBlock(nn.Module, Causal):
    """One encoder level: residual blocks then a downsampler, plus an `AvgDown3D` shortcut around them.
    x: [B, in_dim, T, H, W] -> [B, out_dim, T', H/2, W/2] (T' = 1 + (T-1)/2 when `temporal`;
    H and W are kept at the last level, where `spatial` is False)
    """

    def __init__(self, in_dim, out_dim, dropout, num_res_blocks, temporal, spatial):
        super().__init__()
        self.avg_shortcut = AvgDown3D(out_dim, 2 if temporal else 1, 2 if spatial else 1)
        blocks = _res_blocks(in_dim, out_dim, num_res_blocks, dropout)
        if spatial:
            blocks.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = CausalSequential(*blocks)

    def forward(self, x, cache):
        return self.downsamples(x, cache).add_(self.avg_shortcut(x))


class Up_ResidualBlock(nn.Module, Causal):
    """One decoder level: residual blocks then an upsampler, plus a `DupUp3D` shortcut around them
    (the last level neither upsamples nor has a shortcut).
    x: [B, in_dim, T, H, W] -> [B, out_dim, T', 2H, 2W]
    """

    def __init__(self, in_dim, out_dim, dropout, num_res_blocks, temporal, spatial):
        super().__init__()
        self.avg_shortcut = DupUp3D(in_dim, out_dim, 2 if temporal else 1, 2) if spatial else None
        blocks = _res_blocks(in_dim, out_dim, num_res_blocks, dropout)
        if spatial:
            blocks.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d", out_dim=out_dim))
        self.upsamples = CausalSequential(*blocks)

    def forward(self, x, cache):
        out = self.upsamples(x, cache)
        if self.avg_shortcut is None:
            return out
        starts_video = self not in cache
        cache[self] = True
        return out.add_(self.avg_shortcut(x, starts_video))


class WanVAE22(CausalVideoVAE):
    """The Wan2.2 VAE; arguments are the official config names, defaults the released model's.

    encode: video [B, 3, 4n+1, H, W] in [-1, 1] -> normalized latents [B, z_dim, n+1, H/16, W/16]
    decode: normalized latents [B, z_dim, T, h, w] -> video [B, 3, 4(T-1)+1, 16h, 16w] in [-1, 1]
    attn_scales is accepted for config compatibility; like the official model, Wan2.2 has attention
    only in the middle blocks.
    """

    def __init__(self, dim=160, dec_dim=256, z_dim=48, dim_mult=(1, 2, 4, 4), num_res_blocks=2, attn_scales=(),
                 temperal_downsample=(False, True, True), dropout=0.0, latents_mean=LATENTS_MEAN,
                 latents_std=LATENTS_STD):
        levels = len(dim_mult)
        temporal = [i < levels - 1 and bool(temperal_downsample[i]) for i in range(levels)]
        enc_dims = [dim * m for m in (1, *dim_mult)]
        dec_dims = [dec_dim * m for m in (dim_mult[-1], *dim_mult[::-1])]
        down = [Down_ResidualBlock(enc_dims[i], enc_dims[i + 1], dropout, num_res_blocks, temporal[i],
                                   spatial=i < levels - 1) for i in range(levels)]
        up = [Up_ResidualBlock(dec_dims[i], dec_dims[i + 1], dropout, num_res_blocks + 1, temporal[levels - 2 - i],
                               spatial=i < levels - 1) for i in range(levels)]
        channels = 3 * PATCH_SIZE**2
        super().__init__(encoder3d(channels, enc_dims, CausalSequential(*down), z_dim * 2, dropout),
                         decoder3d(z_dim, dec_dims, CausalSequential(*up), channels, dropout),
                         z_dim, latents_mean, latents_std,
                         temporal_stride=2 ** sum(temporal), spatial_stride=PATCH_SIZE * 2 ** (levels - 1),
                         patch_size=PATCH_SIZE)
