"""UniAnimate-DiT's pose conditioning: two small CNNs turning rendered pose images into Wan DiT inputs.

- `dwpose_embedding` (3D, `PoseVideoEmbedding`): the driving pose video [B, 3, F, H, W] in [0, 1],
  its first frame repeated 3 times in front, -> features [B, 5120, (F - 1) / 4 + 1, H / 16, W / 16]:
  one feature per DiT patch token of the VAE latent (time /4, space /8 then patch 2). Flattened in
  patchify order they are the `add_condition` tokens [B, L, 5120] added right after patch embedding.
- `randomref_embedding_pose` (2D, `ReferencePoseEmbedding`): the reference image's own pose
  [B, 3, H, W] in [0, 1] -> [B, 20, 1, H / 8, W / 8], added to the 20 `y` channels (4 mask + 16
  latent) of every latent frame.

5120 is the width of Wan2.1-14B, for which the released weights were trained; `pose_proj` maps the
tokens to a narrower DiT (nn.Linear(5120, dim), new weights for e.g. the 1.3B) and is the identity
for the 14B. Module and parameter names are the released checkpoint's.
"""

import torch
import torch.nn as nn

POSE_TOKEN_DIM = 5120     # dwpose_embedding's output width, hard-coded in the release (= dim of the 14B)
REF_POSE_CHANNELS = 20    # = the I2V `y` channels
HIDDEN_CHANNELS = 16      # the reference's concat_dim * 4
FIRST_FRAME_REPEATS = 3   # F + 3 pose frames -> (F - 1) / 4 + 1 features: the VAE's frame grouping


def _silu_stack(*convs):
    """conv, SiLU, conv, ..., conv: the released nn.Sequential layout (convs at even indices)."""
    layers = []
    for conv in convs:
        layers += [conv, nn.SiLU()]
    return layers[:-1]


class PoseVideoEmbedding(nn.Sequential):
    """`dwpose_embedding`: a 3D CNN from the pose video to one feature per DiT patch token."""

    def __init__(self, out_channels=POSE_TOKEN_DIM, hidden=HIDDEN_CHANNELS):
        super().__init__(*_silu_stack(
            nn.Conv3d(3, hidden, 3, padding=1),
            nn.Conv3d(hidden, hidden, 3, padding=1),
            nn.Conv3d(hidden, hidden, 3, padding=1),
            nn.Conv3d(hidden, hidden, 3, stride=(1, 2, 2), padding=1),
            nn.Conv3d(hidden, hidden, 3, stride=2, padding=1),
            nn.Conv3d(hidden, hidden, 3, stride=2, padding=1),
            nn.Conv3d(hidden, out_channels, (1, 2, 2), stride=(1, 2, 2))))

    def forward(self, pose_video):
        """pose_video [B, 3, F, H, W] in [0, 1], F = 4n + 1, H and W multiples of 16
        -> features [B, C, n + 1, H / 16, W / 16] (the CNN's dtype)."""
        if pose_video.ndim != 5 or pose_video.shape[1] != 3:
            raise ValueError(f"pose video must be [B, 3, F, H, W], got shape {tuple(pose_video.shape)}")
        first = pose_video[:, :, :1].expand(-1, -1, FIRST_FRAME_REPEATS, -1, -1)
        return super().forward(torch.cat([first, pose_video], dim=2).to(self[0].weight.dtype))


class ReferencePoseEmbedding(nn.Sequential):
    """`randomref_embedding_pose`: a 2D CNN from the reference pose to the `y` channels at latent size."""

    def __init__(self, out_channels=REF_POSE_CHANNELS, hidden=HIDDEN_CHANNELS):
        super().__init__(*_silu_stack(
            nn.Conv2d(3, hidden, 3, padding=1),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.Conv2d(hidden, hidden, 3, stride=2, padding=1),
            nn.Conv2d(hidden, hidden, 3, stride=2, padding=1),
            nn.Conv2d(hidden, out_channels, 3, stride=2, padding=1)))

    def forward(self, ref_pose):
        """ref_pose [B, 3, H, W] in [0, 1] -> [B, C, 1, H / 8, W / 8], broadcastable over latent frames."""
        if ref_pose.ndim != 4 or ref_pose.shape[1] != 3:
            raise ValueError(f"reference pose must be [B, 3, H, W], got shape {tuple(ref_pose.shape)}")
        return super().forward(ref_pose.to(self[0].weight.dtype)).unsqueeze(2)


def features_to_tokens(features):
    """[B, C, f, h, w] -> [B, f * h * w, C], the DiT's patchify order."""
    return features.flatten(2).transpose(1, 2)


class PoseEncoder(nn.Module):
    """Both pose CNNs and `pose_proj`, under the released key names (`dwpose_embedding.N.*`,
    `randomref_embedding_pose.N.*`; `pose_proj.*` only when dim != pose_dim).

    dim: the DiT's width.  pose_dim: dwpose_embedding's output width (5120 in the release).
    ref_channels: the DiT's `y` channels (20 for Wan2.1 I2V); 0 for a DiT without `y` (T2V), which
        then has no reference-pose entry point and no `randomref_embedding_pose`.
    """

    def __init__(self, dim=POSE_TOKEN_DIM, pose_dim=POSE_TOKEN_DIM, ref_channels=REF_POSE_CHANNELS,
                 hidden=HIDDEN_CHANNELS):
        super().__init__()
        self.dwpose_embedding = PoseVideoEmbedding(pose_dim, hidden)
        if ref_channels:
            self.randomref_embedding_pose = ReferencePoseEmbedding(ref_channels, hidden)
        self.pose_proj = nn.Identity() if dim == pose_dim else nn.Linear(pose_dim, dim)

    @property
    def has_reference_pose(self):
        return hasattr(self, "randomref_embedding_pose")

    def pose_tokens(self, pose_video):
        """pose_video [B, 3, F, H, W] in [0, 1] -> `add_condition` tokens [B, L, dim], L = the DiT's
        token count of the (F - 1) / 4 + 1 latent frames. Embed the whole video once: the CNN is
        temporally non-causal, so per-block re-embedding changes the tokens (slice these instead)."""
        tokens = features_to_tokens(self.dwpose_embedding(pose_video))
        if isinstance(self.pose_proj, nn.Linear):
            tokens = tokens.to(self.pose_proj.weight.dtype)
        return self.pose_proj(tokens)

    def condition_y(self, y, ref_pose):
        """y [B, 20, F_lat, h, w] + the reference pose's features [B, 20, 1, h, w], every frame and
        channel (the 4 mask channels too), as the reference does; same y for both CFG branches."""
        if not self.has_reference_pose:
            raise ValueError("this pose encoder has no randomref_embedding_pose (its DiT takes no `y`)")
        features = self.randomref_embedding_pose(ref_pose)
        if features.shape[1] != y.shape[1] or features.shape[3:] != y.shape[3:]:
            raise ValueError(f"reference pose features {tuple(features.shape)} do not fit y {tuple(y.shape)}: "
                             f"render the reference pose at the video's size (8x the latent grid)")
        return y + features.to(y.dtype)

