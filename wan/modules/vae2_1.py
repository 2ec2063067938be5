"""Wan2.1 VAE: causal 3D autoencoder, 16 latent channels, stride 4 x 8 x 8 (T x H x W).

Checkpoint: `Wan2.1_VAE.pth` (a plain state dict with the official key names, which ours equal).
"""

from wan.modules.vae_layers import (AttentionBlock, CausalSequential, CausalVideoVAE, Resample, ResidualBlock,
                                    decoder3d, encoder3d)

# Per-channel statistics of the real model's latents (official code), used to normalize them.
LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


def _stages(dims, blocks_per_level, level_scales, attn_scales, resample_modes, dropout, halved_inputs):
    """The flat list of residual (+ attention) blocks and resamplers of the Wan2.1 encoder or decoder.

    dims: widths from the first level's input to the last level's output. Level i runs
    `blocks_per_level` residual blocks to dims[i+1], each followed by attention when the level's scale
    (`level_scales[i]`) is in `attn_scales`, then a resampler of `resample_modes[i]` (none after the last level).
    halved_inputs: the decoder's upsamplers halve the width, so levels after the first start at half.
    """
    blocks = []
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        if halved_inputs and i > 0:
            in_dim //= 2
        for _ in range(blocks_per_level):
            blocks.append(ResidualBlock(in_dim, out_dim, dropout))
            if level_scales[i] in attn_scales:
                blocks.append(AttentionBlock(out_dim))
            in_dim = out_dim
        if i < len(resample_modes):
            blocks.append(Resample(out_dim, resample_modes[i]))
    return CausalSequential(*blocks)


class WanVAE21(CausalVideoVAE):
    """The Wan2.1 VAE; arguments are the official config names, defaults the released model's.

    encode: video [B, 3, 4n+1, H, W] in [-1, 1] -> normalized latents [B, z_dim, n+1, H/8, W/8]
    decode: normalized latents [B, z_dim, T, h, w] -> video [B, 3, 4(T-1)+1, 8h, 8w] in [-1, 1]
    """

    def __init__(self, dim=96, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2, attn_scales=(),
                 temperal_downsample=(False, True, True), dropout=0.0, latents_mean=LATENTS_MEAN,
                 latents_std=LATENTS_STD):
        levels = len(dim_mult)
        down_modes = ["downsample3d" if t else "downsample2d" for t in temperal_downsample[:levels - 1]]
        up_modes = [m.replace("down", "up") for m in down_modes[::-1]]
        enc_dims = [dim * m for m in (1, *dim_mult)]
        dec_dims = [dim * m for m in (dim_mult[-1], *dim_mult[::-1])]
        # Attention scale of each level as the official code counts it: the encoder's 1 at full
        # resolution halving per level; the decoder's starts at 2 ** -(levels - 2), one off.
        enc_scales = [0.5**i for i in range(levels)]
        dec_scales = [0.5**(levels - 2 - i) for i in range(levels)]
        encoder = encoder3d(3, enc_dims, _stages(enc_dims, num_res_blocks, enc_scales, attn_scales, down_modes,
                                                 dropout, halved_inputs=False), z_dim * 2, dropout)
        decoder = decoder3d(z_dim, dec_dims, _stages(dec_dims, num_res_blocks + 1, dec_scales, attn_scales,
                                                     up_modes, dropout, halved_inputs=True), 3, dropout)
        super().__init__(encoder, decoder, z_dim, latents_mean, latents_std,
                         temporal_stride=2 ** sum(map(bool, temperal_downsample[:levels - 1])),
                         spatial_stride=2 ** (levels - 1))
