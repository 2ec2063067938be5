"""Wan2.2-Animate-14B: the Wan2.1 i2v DiT driven by a pose video and face crops.

Input layout (latent frames): frame 0 is the reference image's slot, frames 1..F-1 the clip. The
condition `y` (mask + latent channels, as i2v) is concatenated to x. Pose latents (16 channels, one
per clip frame) go through `pose_patch_embedding` and are added to the tokens of frames 1.. only.
Face crops run through the motion encoder (one 512-d vector per pixel frame), the face encoder
(temporal downsampling by 4 -> one group of 5 tokens per clip latent frame) and get a zero group
prepended for frame 0; after blocks 0, 5, 10, ... a FaceBlock adds its cross-attention to those
tokens. CLIP image tokens and text as Wan2.1 i2v.

Official hard-coded widths are constructor arguments here (defaults = the release): `face_size`
512, `face_channels` (motion encoder widths per resolution), `style_dim` 512, `face_encoder_width`
1024; a face adapter every 5 blocks (num_layers // 5 of them).
"""

import inspect

import torch

from .face_adapter import FaceAdapter, FaceEncoder
from .model import WanModel
from .motion_encoder import MotionEncoder

FACE_ADAPTER_EVERY = 5
POSE_CHANNELS = 16


class WanAnimateModel(WanModel):
    def __init__(self, motion_encoder_dim=512, use_img_emb=True, face_size=512, face_channels=None, style_dim=512,
                 face_encoder_width=1024, motion_dim=20, model_type="animate", **kwargs):
        if model_type not in ("animate", "i2v"):
            raise ValueError(f"WanAnimateModel extends the i2v model; got model_type '{model_type}'")
        num_layers = kwargs.get("num_layers", inspect.signature(WanModel.__init__).parameters["num_layers"].default)
        if num_layers % FACE_ADAPTER_EVERY:
            raise ValueError(f"Animate puts a face adapter after every {FACE_ADAPTER_EVERY}th block; num_layers "
                             f"must be a multiple of {FACE_ADAPTER_EVERY}, got {num_layers}")
        super().__init__(model_type="i2v", image_branch=use_img_emb, **kwargs)
        self.pose_patch_embedding = torch.nn.Conv3d(POSE_CHANNELS, self.dim, kernel_size=self.patch_size,
                                                    stride=self.patch_size)
        self.motion_encoder = MotionEncoder(face_size, style_dim, motion_dim, motion_encoder_dim, face_channels)
        self.face_adapter = FaceAdapter(self.dim, self.num_heads, num_layers // FACE_ADAPTER_EVERY)
        self.face_encoder = FaceEncoder(motion_encoder_dim, self.dim, width=face_encoder_width)

    @classmethod
    def from_config(cls, config):
        """Builds from an official Animate `config.json` (WanModel's arguments, motion_encoder_dim,
        use_img_emb) plus the face-path widths of this class."""
        accepted = (set(inspect.signature(WanModel.__init__).parameters)
                    | set(inspect.signature(cls.__init__).parameters)) - {"self", "kwargs", "image_branch"}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in accepted})

    def encode_faces(self, face_pixel_values):
        """Face crops [B, 3, T, S, S] in [-1, 1] -> face tokens [B, 1 + T', 5, dim], a zero group first
        (the reference frame's), T' = ceil(T / 4)."""
        if face_pixel_values.ndim != 5:
            raise ValueError(f"face_pixel_values must be [B, 3, T, H, W], got {tuple(face_pixel_values.shape)}")
        b, _, frames = face_pixel_values.shape[:3]
        motion = self.motion_encoder(face_pixel_values.transpose(1, 2).flatten(0, 1)).unflatten(0, (b, frames))
        faces = self.face_encoder(motion)
        return torch.cat([faces.new_zeros(b, 1, *faces.shape[2:]), faces], dim=1).float()

    def embed_pose(self, pose_latents, grid):
        """Pose latents [B, 16, F - 1, H, W] -> tokens [B, L, C] to add: zeros on frame 0."""
        pose = self.pose_patch_embedding(pose_latents.to(self.dtype))
        if (pose.shape[2] + 1, *pose.shape[3:]) != tuple(grid):
            raise ValueError(f"pose latents give the token grid {tuple(pose.shape[2:])}; expected {grid[0] - 1} frames "
                             f"of {tuple(grid[1:])} (one latent frame less than x: frame 0 is the reference)")
        pose = torch.cat([pose.new_zeros(*pose.shape[:2], 1, *pose.shape[3:]), pose], dim=2)
        return pose.flatten(2).transpose(1, 2).float()

    def forward(self, x, t, context, *, y, clip_fea, pose_latents, face_pixel_values):
        """
        x: [B, 16, F, H, W] noisy latents (frame 0: the reference slot).  t: [B] timesteps.
        context: [B, Lt, text_dim] text embeddings (or a list of [Lt_i, text_dim]).
        y: [B, 20, F, H, W] mask + condition latents.  clip_fea: [B, 257, 1280] CLIP tokens of the reference.
        pose_latents: [B, 16, F - 1, H, W].  face_pixel_values: [B, 3, T, 512, 512], ceil(T / 4) = F - 1.
        Returns [B, 16, F, H, W] fp32.
        """
        tokens, grid = self.embed_tokens(torch.cat([x, y.to(x.dtype)], dim=1))
        tokens = tokens + self.embed_pose(pose_latents, grid)
        faces = self.encode_faces(face_pixel_values)
        if faces.shape[1] != grid[0]:
            raise ValueError(f"{face_pixel_values.shape[2]} face frames give {faces.shape[1] - 1} latent frames but x "
                             f"has {grid[0] - 1} after the reference; give 4n+1 frames for n+1 latent frames")
        e, e0 = self.embed_time(t, tokens.shape[1])
        context = self.embed_context(context, clip_fea)

        def add_face(i, x):
            if i % FACE_ADAPTER_EVERY:
                return x
            return x + self.face_adapter.fuser_blocks[i // FACE_ADAPTER_EVERY](x, faces)

        tokens = self.run_blocks(tokens, e0, self.rope(grid, tokens.device), context, after_block=add_face)
        return self.project_out(tokens, e, grid)
