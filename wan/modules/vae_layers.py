"""Pieces shared by the Wan2.1 and Wan2.2 causal video VAEs, and the encode/decode driver they both use.

Causality and the feature cache: every layer that looks back in time takes a `cache` dict, keyed by
the layer itself, holding what it needs from the frames before the current chunk (the last input
frames of a causal conv, the last frame before a strided time conv, whether a chunk was seen yet).
An empty dict starts a new video; passing the same dict again continues that video. Encoding runs
the frames in chunks of 1, 4, 4, ... and decoding one latent frame at a time through one cache, so
every call owns its state and two calls never see each other's frames.

Module and parameter names follow the official code so `state_dict()` keys equal the checkpoints'.
"""

import itertools
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from wan.modules.vae_tiling import check_tiles, tiled_apply

DEFAULT_TILE_SIZE = (256, 256)  # pixels (h, w)
DEFAULT_TILE_OVERLAP = (64, 64)
# The decoder runs frame by frame from frames of this many pixels (H x W) on (see
# `run_sliced_in_time`). Each per-frame convolution re-lays out its weights (oneDNN), a cost
# against the frame's work that grows as the frame shrinks: about 5% at 32 x 32, 20% at 16 x 16.
DECODE_SLICE_PIXELS = 32 * 32


# oneDNN also copies the whole weight into its blocked layout on every call. Convolutions with more
# weight elements than this run in groups of output channels, which bounds that transient copy (56 MiB
# for a 1024 -> 512 layer of the Wan2.2 decoder) at the cost of re-reading the input once per group.
ONEDNN_WEIGHT_GROUP_ELEMENTS = 2**22


def conv3d(x, weight, bias, stride=1, padding=0):
    """`F.conv3d` with a choice of CPU kernel that suits video chunks (fp32).

    PyTorch picks the kernel with a size rule made for images, which sends small chunks (such as the
    decoder's one-frame steps) to the im2col kernel, several times slower than oneDNN there. But
    oneDNN re-lays out the weights on every call, which does not pay off with few positions per
    weight: measured on the Wan VAE shapes, it wins from about as many input positions as channels.
    """
    if x.device.type != "cpu" or x.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return F.conv3d(x, weight, bias, stride, padding)
    stride, padding = ([v] * 3 if isinstance(v, int) else list(v) for v in (stride, padding))
    if x.shape[2:].numel() < x.shape[1]:
        return torch.ops.aten.slow_conv3d(x, weight, weight.shape[2:], bias, stride, padding)
    # a multiple of 16 channels, oneDNN's block
    group = max(16, ONEDNN_WEIGHT_GROUP_ELEMENTS // weight[0].numel() // 16 * 16)
    if weight.shape[0] <= group:
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, padding, stride, [1, 1, 1], 1)
    biases = bias.split(group) if bias is not None else itertools.repeat(None)
    return torch.cat([torch.ops.aten.mkldnn_convolution(x, w, b, padding, stride, [1, 1, 1], 1)
                      for w, b in zip(weight.split(group), biases)], dim=1)


class Causal:
    """Marker for modules called as `forward(x, cache)`; `CausalSequential` hands them its cache."""


class CausalSequential(nn.Sequential, Causal):
    """`nn.Sequential` that passes the feature cache to the layers that take one."""

    def forward(self, x, cache):
        return run_sliced_in_time(list(self), x, cache, slice_pixels=None)


def causal_units(module):
    """The layers of (nested) `CausalSequential`s, flattened in call order."""
    if isinstance(module, CausalSequential):
        return [unit for layer in module for unit in causal_units(layer)]
    return [module]


def run_sliced_in_time(units, x, cache, slice_pixels):
    """Runs the layers `units` (e.g. `causal_units`) over x [B, C, T, H, W]. Once a unit's output has more than
    one frame of at least `slice_pixels` pixels (None: never), the units after it run frame
    by frame, the frames joined in time at the end. Exact, because every unit is causal with its
    state in `cache`: the frames continue each other as the whole chunk would. The decoder's
    upsamplers make 4 frames of each latent frame at 4x-16x the pixels; slicing bounds those
    high-resolution activations to one frame."""
    for i, unit in enumerate(units):
        x = unit(x, cache) if isinstance(unit, Causal) else unit(x)
        if slice_pixels is not None and x.shape[2] > 1 and x.shape[3] * x.shape[4] >= slice_pixels \
                and i + 1 < len(units):
            rest = units[i + 1:]
            return torch.cat([run_sliced_in_time(rest, frame, cache, slice_pixels)
                              for frame in x.split(1, dim=2)], dim=2)
    return x


class CausalConv3d(nn.Conv3d, Causal):
    """3D convolution that sees only the present and the past in time.

    A kernel `kt` frames deep with time padding `p` looks at `2p` earlier frames: those of the
    previous chunk come from the cache, zeros before the first frame. Running a video in chunks
    therefore equals running it whole. Space is padded symmetrically by the convolution itself,
    which saves the copy an explicit pad would make.
    x: [B, C, T, H, W] -> [B, C', T', H', W']
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        pad = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=(0, pad[1], pad[2]))
        self.history = 2 * pad[0]

    def forward(self, x, cache=None):
        if self.history:
            past = None if cache is None else cache.get(self)
            # The first frame alone skips its zero padding, unless it has fewer pixels than input
            # channels: then the sliced kernel's copy costs more than the zeros it skips.
            if past is None and x.shape[2] == 1 and self.kernel_size[0] == self.history + 1 \
                    and x.shape[3] * x.shape[4] >= self.in_channels:
                return self._first_frame(x, cache)
            if past is None:
                x = F.pad(x, (0, 0, 0, 0, self.history, 0))
            else:
                x = torch.cat([past, x], dim=2)
            if cache is not None:
                # clone: a view would keep the whole chunk alive until the next call
                cache[self] = x[:, :, -self.history:].clone()
            del past  # the replaced cache entry is not held through the convolution
        return conv3d(x, self.weight, self.bias, self.stride, self.padding)

    def _first_frame(self, x, cache):
        """The first frame of a video alone (every decode and encode starts so): only the kernel's
        last time slice meets it, the others meet the zero padding, so those 2/3 of the FLOPs are
        skipped. The cache holds what the padded input would have left."""
        if cache is not None:
            cache[self] = F.pad(x, (0, 0, 0, 0, self.history - 1, 0))
        return conv3d(x, self.weight[:, :, -1:], self.bias, self.stride, self.padding)


class FrameConv2d(nn.Conv2d):
    """2D convolution applied to every frame of a video, as the official per-frame Conv2d.

    Runs as a 3D convolution with a kernel one frame deep, which avoids folding time into the batch
    (two transposing copies). Keeps the Conv2d parameter shapes of the checkpoints.
    x: [B, C, T, H, W] -> [B, C', T, H', W']
    """

    def forward(self, x):
        return conv3d(x, self.weight.unsqueeze(2), self.bias, (1, *self.stride), (0, *self.padding))


# For each output phase of a 2x nearest upsampling (even, odd positions): which taps of a 3-tap
# kernel land on each of the two input samples the phase sees. [phase, input sample, kernel tap]
_UPSAMPLE_PHASE_TAPS = ((1, 0, 0), (0, 1, 1)), ((1, 1, 0), (0, 0, 1))


class UpsampleConv(nn.Sequential):
    """2x nearest spatial upsampling then a 3x3 `FrameConv2d`, as the official decoder's resampler,
    computed without the upsampled tensor: each of the four output pixel phases is a 2x2 convolution of
    the input with the 3x3 taps that fall on the same input pixel summed, 4/9 of the FLOPs. The plain
    path (upsample, then convolve) is `nn.Sequential.forward`.
    x: [B, C, T, H, W] -> [B, C', T, 2H, 2W]
    """

    def __init__(self, dim, out_dim):
        super().__init__(nn.Upsample(scale_factor=(1.0, 2.0, 2.0), mode="nearest-exact"),
                         FrameConv2d(dim, out_dim, 3, padding=1))

    def forward(self, x):
        conv = self[1]
        out_dim, b, t, h, w = conv.out_channels, x.shape[0], *x.shape[2:]
        if t * h * w < 4 * out_dim:
            # The phase kernels (16/9 of the 3x3 kernel) would outweigh the upsampled input they spare.
            return super().forward(x)
        taps = torch.tensor(_UPSAMPLE_PHASE_TAPS, dtype=torch.float32, device=x.device)
        # [row phase, column phase, out, in, 2, 2], summed in fp32 whatever the weights' dtype
        weight = torch.einsum("auy,cvx,oiyx->acoiuv", taps, taps, conv.weight.float()).to(x.dtype)
        bias = None if conv.bias is None else conv.bias.repeat(4)
        # Padded by one input pixel on each side: phase 0 reads input rows (i-1, i), phase 1 rows (i, i+1).
        phases = conv3d(x, weight.reshape(4 * out_dim, -1, 1, 2, 2), bias, 1, (0, 1, 1))
        phases = phases.view(b, 2, 2, out_dim, t, h + 1, w + 1)
        out = x.new_empty(b, out_dim, t, 2 * h, 2 * w)
        pixels = out.view(b, out_dim, t, h, 2, w, 2)
        for row in (0, 1):
            for col in (0, 1):
                pixels[:, :, :, :, row, :, col] = phases[:, row, col, :, :, row:row + h, col:col + w]
        return out


class RMS_norm(nn.Module):
    """Scales each position's channel vector to unit RMS (L2 norm times sqrt(C)), then by a learned gain.

    `images=True` gives the gain the [C, 1, 1] shape of the official attention norm (which ran on
    [B*T, C, H, W]); it applies to [B, C, T, H, W] input all the same.
    """

    def __init__(self, dim, images=False):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * (2 if images else 3)))

    def forward(self, x):
        gain = self.gamma.view(-1, *(1,) * (x.ndim - 2)) * self.scale
        if x.dtype != torch.float32:
            return F.normalize(x, dim=1).mul_(gain)
        # F.normalize's x / max(|x|, 1e-12) as one multiply by a clamped rsqrt: a third of its time
        # on CPU, and the same value wherever |x| >= 1e-12.
        return (x * x.square().sum(1, keepdim=True).clamp_(min=1e-24).rsqrt_()).mul_(gain)


class Resample(nn.Module, Causal):
    """Halves or doubles H and W, and for the '3d' modes also T (causally).

    downsample3d: after the spatial stride-2 conv, a stride-2 time conv over [last frame of the previous
    chunk, this chunk]; the first chunk of a video passes untouched, so T frames become 1 + (T-1)/2.
    upsample3d: a time conv makes two frames of each input frame (channels 2C -> 2 x C), except for
    the first frame of a video, which stays one frame: T frames become 2T - 1.
    x: [B, C, T, H, W] -> [B, C', T', H*2 or H/2, W*2 or W/2]
    """

    def __init__(self, dim, mode, out_dim=None):
        super().__init__()
        if mode not in ("upsample2d", "upsample3d", "downsample2d", "downsample3d"):
            raise ValueError(f"unknown resample mode '{mode}'")
        self.mode = mode
        # Index 0 is the parameter-free resize, so the conv is `resample.1` as in the checkpoints.
        if mode.startswith("upsample"):
            # Wan2.1 halves the channels in the upsampling conv, Wan2.2 keeps them (out_dim=dim).
            out_dim = dim // 2 if out_dim is None else out_dim
            self.resample = UpsampleConv(dim, out_dim)
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        else:
            # The official stride-2 conv pads only the bottom and right edges.
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), FrameConv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x, cache):
        if self.mode == "upsample3d":
            if self in cache:
                b, c, t, h, w = x.shape
                # channels [first frame | second frame] -> frames interleaved in time
                x = self.time_conv(x, cache).view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5)
                x = x.reshape(b, c, 2 * t, h, w)
            else:
                cache[self] = True
        x = self.resample(x)
        if self.mode == "downsample3d":
            previous = cache.get(self)
            cache[self] = x[:, :, -1:].clone()
            if previous is not None:
                x = self.time_conv(torch.cat([previous, x], dim=2))
        return x


class ResidualBlock(nn.Module, Causal):
    """(norm, SiLU, causal 3x3x3 conv) twice, plus a 1x1x1 conv shortcut when the width changes.
    x: [B, in_dim, T, H, W] -> [B, out_dim, T, H, W]
    """

    def __init__(self, in_dim, out_dim, dropout=0.0):
        super().__init__()
        # In-place SiLU is safe: it always follows a norm, whose output nothing else holds.
        self.residual = CausalSequential(
            RMS_norm(in_dim), nn.SiLU(inplace=True), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim), nn.SiLU(inplace=True), nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x, cache):
        return self.residual(x, cache).add_(self.shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention among the H*W positions of each frame; frames do not see each other.
    x: [B, C, T, H, W] -> same shape
    """

    def __init__(self, dim):
        super().__init__()
        self.norm = RMS_norm(dim, images=True)
        self.to_qkv = FrameConv2d(dim, dim * 3, 1)
        self.proj = FrameConv2d(dim, dim, 1)

    def forward(self, x):
        b, c, t, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).permute(0, 2, 3, 4, 1).reshape(b * t, 1, h * w, 3 * c)
        q, k, v = qkv.chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(y.view(b, t, h, w, c).permute(0, 4, 1, 2, 3))


def middle_blocks(dim, dropout):
    return CausalSequential(ResidualBlock(dim, dim, dropout), AttentionBlock(dim), ResidualBlock(dim, dim, dropout))


def output_head(dim, out_channels):
    return CausalSequential(RMS_norm(dim), nn.SiLU(inplace=True), CausalConv3d(dim, out_channels, 3, padding=1))


def encoder3d(in_channels, dims, downsamples, out_channels, dropout):
    """conv1 -> resampling stages `downsamples` (widths dims[0] .. dims[-1]) -> middle -> head."""
    return CausalSequential(OrderedDict(
        conv1=CausalConv3d(in_channels, dims[0], 3, padding=1), downsamples=downsamples,
        middle=middle_blocks(dims[-1], dropout), head=output_head(dims[-1], out_channels)))


def decoder3d(in_channels, dims, upsamples, out_channels, dropout):
    """conv1 -> middle -> resampling stages `upsamples` (widths dims[0] .. dims[-1]) -> head."""
    return CausalSequential(OrderedDict(
        conv1=CausalConv3d(in_channels, dims[0], 3, padding=1), middle=middle_blocks(dims[0], dropout),
        upsamples=upsamples, head=output_head(dims[-1], out_channels)))


def patchify(x, p):
    """Folds each p x p pixel block into channels, ordered (c, w offset, h offset) as the official code.
    [B, C, T, H, W] -> [B, C*p*p, T, H/p, W/p]
    """
    if p == 1:
        return x
    b, c, t, h, w = x.shape
    x = x.view(b, c, t, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(b, c * p * p, t, h // p, w // p)


def unpatchify(x, p):
    """Inverse of `patchify`: [B, C*p*p, T, H, W] -> [B, C, T, H*p, W*p]"""
    if p == 1:
        return x
    b, cpp, t, h, w = x.shape
    x = x.view(b, cpp // (p * p), p, p, t, h, w).permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(b, cpp // (p * p), t, h * p, w * p)


class CausalVideoVAE(nn.Module):
    """Encode/decode driver of the Wan VAEs around an `encoder3d` and a `decoder3d`.

    Latents are normalized per channel with `latents_mean`/`latents_std` inside `encode`/`decode`,
    so callers only ever see normalized latents. The statistics are non-persistent buffers: they are
    not in the checkpoints, and they are made on the CPU even when the model is built on the meta
    device, so that loading a checkpoint leaves them usable.
    """

    def __init__(self, encoder, decoder, z_dim, latents_mean, latents_std, temporal_stride, spatial_stride,
                 patch_size=1):
        super().__init__()
        if len(latents_mean) != z_dim or len(latents_std) != z_dim:
            raise ValueError(f"latents_mean/latents_std have {len(latents_mean)}/{len(latents_std)} values but "
                             f"z_dim is {z_dim}; pass one mean and one std per latent channel")
        self.z_dim = z_dim
        self.temporal_stride = temporal_stride
        self.spatial_stride = spatial_stride
        self.patch_size = patch_size
        self.encoder = encoder
        self.conv1 = CausalConv3d(z_dim * 2, z_dim * 2, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = decoder
        for name, values in (("latents_mean", latents_mean), ("latents_std", latents_std)):
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32, device="cpu"), persistent=False)

    @property
    def dtype(self):
        return self.conv2.weight.dtype

    @property
    def device(self):
        return self.conv2.weight.device

    def _stats(self, like):
        shape = (1, self.z_dim, 1, 1, 1)
        return (self.latents_mean.to(like.device).view(shape), self.latents_std.to(like.device).view(shape))

    # ---------------------------------------------------------------- input checks

    def _check_ndim(self, x, what, layout):
        if x.ndim != 5:
            fix = " (add the batch dim with .unsqueeze(0))" if x.ndim == 4 else ""
            raise ValueError(f"{what} must be 5D {layout}, got shape {tuple(x.shape)}{fix}")

    def check_video(self, video):
        self._check_ndim(video, "video", "[B, 3, T, H, W]")
        _, c, t, h, w = video.shape
        if c != 3:
            raise ValueError(f"video must have 3 (RGB) channels in dim 1 of [B, 3, T, H, W], got {c} "
                             f"(shape {tuple(video.shape)}); permute [B, T, C, H, W] input with .transpose(1, 2)")
        s, ts = self.spatial_stride, self.temporal_stride
        if (t - 1) % ts:
            lo = (t - 1) // ts * ts + 1
            raise ValueError(f"video has {t} frames; the causal VAE needs {ts}n+1 frames: "
                             f"trim to {lo} or pad to {lo + ts}")
        if h % s or w % s:
            raise ValueError(f"video size {h}x{w} is not divisible by the spatial stride {s}; "
                             f"resize or crop to e.g. {h // s * s}x{w // s * s}")

    def check_latents(self, latents):
        self._check_ndim(latents, "latents", f"[B, {self.z_dim}, T, H, W]")
        if latents.shape[1] != self.z_dim:
            raise ValueError(f"latents have {latents.shape[1]} channels but this VAE has z_dim {self.z_dim} "
                             f"(shape {tuple(latents.shape)}); latents of another VAE version?")

    # ---------------------------------------------------------------- encode

    def encode(self, video, tiled=False, tile_size=DEFAULT_TILE_SIZE, tile_overlap=DEFAULT_TILE_OVERLAP):
        """video [B, 3, T, H, W] in [-1, 1], T = 4n+1 -> normalized mean latents
        [B, z_dim, n+1, H/s, W/s] (float32). `tiled` encodes overlapping spatial tiles of
        `tile_size` pixels and blends them linearly over `tile_overlap` pixels, bounding memory."""
        self.check_video(video)
        if not tiled:
            return self._encode(video)
        tile, overlap = check_tiles(tile_size, tile_overlap, self.spatial_stride)
        return tiled_apply(lambda x, key: self._encode(x), video, tile, overlap, self.spatial_stride, 1)

    def _encode(self, video):
        x = patchify(video.to(self.device, self.dtype), self.patch_size)
        first, rest = x[:, :, :1], x[:, :, 1:]
        cache, mu = {}, []
        # Only the mean half of conv1 (a 1x1x1 conv) is needed: skip computing the log-variance.
        weight, bias = self.conv1.weight[:self.z_dim], self.conv1.bias[:self.z_dim]
        # `split` of zero frames would still yield one empty chunk: a one-frame video is `first` alone.
        for chunk in (first, *(rest.split(self.temporal_stride, dim=2) if rest.shape[2] else ())):
            mu.append(conv3d(self.encoder(chunk, cache), weight, bias).float())
        mean, std = self._stats(x)
        return (torch.cat(mu, dim=2) - mean) / std

    # ---------------------------------------------------------------- decode

    def decode(self, latents, tiled=False, tile_size=DEFAULT_TILE_SIZE, tile_overlap=DEFAULT_TILE_OVERLAP,
               clamp=True):
        """Normalized latents [B, z_dim, T, h, w] -> video [B, 3, 4(T-1)+1, h*s, w*s] (float32),
        clamped to [-1, 1] unless `clamp=False`. `tiled`: as in `encode` (sizes in pixels)."""
        video = self.decode_frames(latents, None, tiled, tile_size, tile_overlap)
        return video.clamp_(-1, 1) if clamp else video

    def decode_frames(self, latents, cache, tiled=False, tile_size=DEFAULT_TILE_SIZE,
                      tile_overlap=DEFAULT_TILE_OVERLAP):
        """Decodes latent frames that continue the video whose decoder state is in `cache` (an empty
        dict starts a video: its first latent frame gives one pixel frame, every other one gives 4);
        `cache=None` decodes a whole video and keeps no state. Unclamped float32 pixels. With
        `tiled`, the cache holds one sub-cache per tile: streaming keeps them all, a whole-video
        decode drops each when its tile is done."""
        self.check_latents(latents)
        if not tiled:
            return self._decode_frames(latents, {} if cache is None else cache)
        tile, overlap = check_tiles(tile_size, tile_overlap, self.spatial_stride)
        tile_cache = (lambda key: {}) if cache is None else (lambda key: cache.setdefault(key, {}))
        return tiled_apply(lambda z, key: self._decode_frames(z, tile_cache(key)),
                           latents, tile, overlap, 1, self.spatial_stride)

    def _decode_frames(self, latents, cache):
        b, _, t, h, w = latents.shape
        latents = latents.to(self.device, torch.float32)
        mean, std = self._stats(latents)
        z = (latents * std + mean).to(self.dtype)
        ts, s = self.temporal_stride, self.spatial_stride
        starts = not cache
        # Filled frame by frame: collecting the frames and concatenating would hold the video twice.
        video = torch.empty(b, 3, t * ts - (ts - 1 if starts else 0), h * s, w * s, device=z.device,
                            dtype=torch.float32)
        end = 0
        units = causal_units(self.decoder)
        for i in range(t):
            frames = run_sliced_in_time(units, self.conv2(z[:, :, i:i + 1]), cache, DECODE_SLICE_PIXELS)
            frames = unpatchify(frames, self.patch_size)
            video[:, :, end:end + frames.shape[2]] = frames
            end += frames.shape[2]
        return video
