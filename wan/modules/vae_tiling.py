"""Spatial tiling: run a video op on overlapping H x W tiles and blend them, bounding peak memory.

Tiles are laid out on the latent grid, so the same layout serves encoding (pixels in, latents out)
and decoding (latents in, pixels out). Each tile runs through its own causal feature cache; on the
overlaps the tiles are cross-faded linearly, which hides the seams the zero padding at tile edges
would leave. Peak memory is the output plus one tile's activations.
"""

import math

import torch


def _pair(value):
    return (value, value) if isinstance(value, int) else tuple(value)


def check_tiles(tile_size, tile_overlap, stride):
    """Pixel tile size and overlap (int or (h, w)) -> the same in latent units, validated."""
    tile, overlap = _pair(tile_size), _pair(tile_overlap)
    for name, value in (("tile_size", tile), ("tile_overlap", overlap)):
        if len(value) != 2 or any(v < 0 or v % stride for v in value):
            raise ValueError(f"{name}={value} must be (h, w) pixels, non-negative multiples of the VAE's "
                             f"spatial stride {stride}, e.g. (256, 256) and (64, 64)")
    if any(o >= t for o, t in zip(overlap, tile)):
        raise ValueError(f"tile_overlap={overlap} must be smaller than tile_size={tile}")
    return tuple(t // stride for t in tile), tuple(o // stride for o in overlap)


def tile_spans(size, tile, overlap):
    """[start, end) spans of length `tile` covering range(size), neighbours sharing at least `overlap`.

    The starts are spread evenly so that every tile has the full size and the overlaps are balanced.
    """
    if size <= tile:
        return [(0, size)]
    count = math.ceil((size - overlap) / (tile - overlap))
    return [(i * (size - tile) // (count - 1), i * (size - tile) // (count - 1) + tile) for i in range(count)]


def blend_weights(spans, scale, device):
    """Per tile, a [length * scale] weight that ramps linearly across its overlaps with its neighbours.

    Two overlapping ramps sum to one, so the blend is a convex combination of the tiles.
    """
    weights = []
    for i, (start, end) in enumerate(spans):
        pos = torch.arange((end - start) * scale, device=device, dtype=torch.float32) + 0.5
        w = torch.ones_like(pos)
        if i > 0:
            w = torch.minimum(w, pos / ((spans[i - 1][1] - start) * scale))
        if i + 1 < len(spans):
            w = torch.minimum(w, pos.flip(0) / ((end - spans[i + 1][0]) * scale))
        weights.append(w)
    return weights


def tiled_apply(fn, x, tile, overlap, in_scale, out_scale):
    """Applies `fn(x_tile, key)` to overlapping spatial tiles of `x` and blends the results.

    x: [B, C, T, H, W], H and W being `in_scale` times the latent grid; fn returns [B, C', T', h', w']
    with h', w' being `out_scale` times the tile's grid size. `key` names the tile (its grid origin),
    for callers that keep per-tile state. tile, overlap: (h, w) in grid units.
    Returns the float32 blend [B, C', T', H/in_scale*out_scale, W/in_scale*out_scale].
    """
    grid_h, grid_w = x.shape[-2] // in_scale, x.shape[-1] // in_scale
    rows, cols = tile_spans(grid_h, tile[0], overlap[0]), tile_spans(grid_w, tile[1], overlap[1])
    if len(rows) == 1 and len(cols) == 1:
        return fn(x, (0, 0)).float()
    row_w, col_w = blend_weights(rows, out_scale, x.device), blend_weights(cols, out_scale, x.device)
    out = None
    for (h0, h1), wh in zip(rows, row_w):
        for (w0, w1), ww in zip(cols, col_w):
            y = fn(x[..., h0 * in_scale:h1 * in_scale, w0 * in_scale:w1 * in_scale], (h0, w0))
            if out is None:
                out = y.new_zeros(*y.shape[:3], grid_h * out_scale, grid_w * out_scale, dtype=torch.float32)
                total = torch.zeros(grid_h * out_scale, grid_w * out_scale, device=x.device)
            weight = wh[:, None] * ww[None, :]
            region = (..., slice(h0 * out_scale, h1 * out_scale), slice(w0 * out_scale, w1 * out_scale))
            out[region] += y * weight
            total[region] += weight
    return out.div_(total)
