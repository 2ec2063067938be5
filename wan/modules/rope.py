"""3D rotary position embedding of the Wan DiT, in fp32 real arithmetic.

The head dim d splits into d - 4*(d//6) channels for time and 2*(d//6) each for height and width
(theta 10000). Channels rotate in adjacent pairs (2i, 2i+1), as the official complex-number
version does. Positions are explicit [L, 3] (frame, row, column) indices, so callers can shift
frames (causal blocks, rolling windows) or place extra tokens anywhere.
"""

import torch


def axis_dims(head_dim):
    """Channels per axis (time, height, width) for a head dim."""
    if head_dim % 2:
        raise ValueError(f"head dim must be even for RoPE, got {head_dim}")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def grid_positions(frames, height, width, frame_offset=0, device=None):
    """[F*H*W, 3] integer (frame, row, column) positions of a latent token grid, in f-h-w order."""
    f = torch.arange(frame_offset, frame_offset + frames, device=device)
    h = torch.arange(height, device=device)
    w = torch.arange(width, device=device)
    return torch.stack(torch.meshgrid(f, h, w, indexing="ij"), dim=-1).reshape(-1, 3)


def rope_angles(positions, head_dim, theta=10000.0):
    """Rotation angles [L, head_dim / 2] for positions [L, 3], computed in float64."""
    angles = []
    for axis, dim in enumerate(axis_dims(head_dim)):
        inv_freq = theta ** -(torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
        angles.append(positions[:, axis, None].double() * inv_freq)
    return torch.cat(angles, dim=1)


def rope_cos_sin(positions, head_dim, theta=10000.0):
    """(cos, sin), each [L, 1, head_dim / 2] in fp32, ready to broadcast over [B, L, H, D/2]."""
    angles = rope_angles(positions, head_dim, theta)
    return angles.cos().float()[:, None], angles.sin().float()[:, None]


def apply_rope(x, cos, sin):
    """Rotates channel pairs of x [B, L, H, D] by the angles behind cos/sin [L, 1, D/2].

    Computed in fp32, returned in the dtype of x. Tokens past len(cos) are left unrotated.
    """
    n = cos.shape[0]
    # One complex multiply: a single pass over x (the real-arithmetic form takes about eight).
    pairs = x[:, :n].float().unflatten(-1, (-1, 2))
    if pairs.stride(-1) != 1 or any(s % 2 for s in pairs.stride()[:-1]):
        pairs = pairs.contiguous()
    rotated = torch.view_as_complex(pairs) * torch.complex(cos, sin)
    out = torch.view_as_real(rotated).flatten(-2).type_as(x)
    if n == x.shape[1]:
        return out
    return torch.cat([out, x[:, n:]], dim=1)
