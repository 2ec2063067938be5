"""The VACE context: what Wan2.1-VACE is conditioned on, built from pixels with the Wan2.1 VAE.

For a source video `frames` [3, F, H, W] in [-1, 1] and a mask [1, F, H, W] in [0, 1] (1 = generate):
- z0 [32, F', h, w] = VAE(frames * (1 - m)) ("inactive", kept) | VAE(frames * m) ("reactive") with
  m the mask binarized at 0.5;
- m0 [64, F', h, w]: the raw mask with each 8x8 pixel block unfolded into 64 channels
  (channel 8 * dy + dx), the frame axis resized to F' = (F + 3) // 4 with `nearest-exact`
  (latent frame j takes pixel frame floor((j + 0.5) * F / F'), i.e. 1, 5, 9, ... for 81 frames);
- reference images [3, 1, H, W] become one latent frame each (VAE latent | 16 zero channels, and
  zero mask channels), prepended on the frame axis in list order.
The context is cat(z0, m0) [96, n_refs + F', h, w]; the noisy latent has z0's frames and 16 channels.
"""

import torch
import torch.nn.functional as F


def binarize(mask):
    return (mask > 0.5).to(mask.dtype)


@torch.no_grad()
def encode_frames(vae, frames, mask, ref_images=()):
    """z0 [2 * z_dim, n_refs + F', h, w]: inactive | reactive latents, reference latents first.
    frames [3, F, H, W], mask [1 or 3, F, H, W] (binarized here), ref_images: [3, 1, H, W] each."""
    m = binarize(mask)
    pair = torch.stack([frames * (1 - m), frames * m]).to(vae.device)
    inactive, reactive = vae.encode(pair).float().cpu()
    latents = torch.cat([inactive, reactive])
    if not ref_images:
        return latents
    refs = vae.encode(torch.stack(list(ref_images)).to(vae.device)).float().cpu()  # [n, z, 1, h, w]
    refs = torch.cat([refs, torch.zeros_like(refs)], dim=1)
    return torch.cat([*refs, latents], dim=1)


def pack_mask(mask, num_refs=0, vae_stride=(4, 8, 8)):
    """m0 [sh * sw, n_refs + F', H / sh, W / sw] from the raw mask [C, F, H, W] (channel 0 is used)."""
    st, sh, sw = vae_stride
    _, frames, height, width = mask.shape
    if height % sh or width % sw:
        raise ValueError(f"mask size {height}x{width} is not a multiple of the VAE stride {sh}x{sw}")
    h, w = height // sh, width // sw
    packed = mask[0].reshape(frames, h, sh, w, sw).permute(2, 4, 0, 1, 3).reshape(sh * sw, frames, h, w)
    packed = F.interpolate(packed[None].float(), size=((frames + st - 1) // st, h, w), mode="nearest-exact")[0]
    return torch.cat([packed.new_zeros(sh * sw, num_refs, h, w), packed], dim=1)


def vace_context(vae, frames, mask, ref_images=()):
    """cat(z0, m0) [96, n_refs + F', h, w] (see the module docstring)."""
    z0 = encode_frames(vae, frames, mask, ref_images)
    stride = (vae.temporal_stride, vae.spatial_stride, vae.spatial_stride)
    return torch.cat([z0, pack_mask(mask, len(ref_images), stride).to(z0)])

