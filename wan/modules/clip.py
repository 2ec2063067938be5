"""CLIP ViT-H/14 image tower of `open-clip-xlm-roberta-large-vit-huge-14`, as Wan's I2V models use it.

Wan conditions on the hidden states of all 257 tokens (class token + 16x16 patches) after the
penultimate transformer block, not on the pooled CLIP embedding. Key names follow the `visual.*`
part of `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`; its text tower (`textual.*`)
and `log_scale` are not needed and skipped on load.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import load_model
from ..convert.encoders_hf import clip_from_hf, is_hf_clip
from .attention import attention
from .norms import LayerNorm

# OpenAI CLIP normalization, applied to images in [0, 1].
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation of the original OpenAI CLIP weights."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


def interpolate_pos_embedding(pos, grid):
    """Resizes a square patch position grid to `grid` = (rows, cols), bicubically.

    pos: [1, 1 + n*n, C] (class token first) -> [1, 1 + rows*cols, C], unchanged if the size fits.
    """
    n = round((pos.shape[1] - 1) ** 0.5)
    if tuple(grid) == (n, n):
        return pos
    patches = pos[:, 1:].float().reshape(1, n, n, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=tuple(grid), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], patches.flatten(2).transpose(1, 2).to(pos.dtype)], dim=1)


class SelfAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        """x: [B, L, C] -> [B, L, C]."""
        q, k, v = self.to_qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(2)
        return self.proj(attention(q, k, v).flatten(2))


class AttentionBlock(nn.Module):
    """Transformer block; `post_norm` normalizes each branch's output instead of its input."""

    def __init__(self, dim, mlp_ratio, num_heads, post_norm, activation, norm_eps):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.post_norm = post_norm
        self.norm1 = LayerNorm(dim, eps=norm_eps, elementwise_affine=True)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = LayerNorm(dim, eps=norm_eps, elementwise_affine=True)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), ACTIVATIONS[activation](), nn.Linear(hidden, dim))

    def forward(self, x):
        """x: [B, L, C] -> [B, L, C]."""
        if self.post_norm:
            x = x + self.norm1(self.attn(x))
            return x + self.norm2(self.mlp(x))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """CLIP vision tower with a class token; the defaults are ViT-H/14 at 224 px (632M parameters).

    Args use the official names. `pre_norm` adds a LayerNorm before the blocks (and drops the
    patch embedding's bias); `post_norm` switches the blocks to post-norm. Only the class-token
    pooling (`pool_type='token'`) of the Wan checkpoint is implemented.
    """

    def __init__(self, image_size=224, patch_size=14, dim=1280, mlp_ratio=4, out_dim=1024, num_heads=16,
                 num_layers=32, pool_type="token", pre_norm=True, post_norm=False, activation="gelu",
                 norm_eps=1e-5):
        super().__init__()
        if pool_type != "token":
            raise ValueError(f"pool_type '{pool_type}' is not implemented; Wan's CLIP uses 'token'")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation '{activation}' is not one of {sorted(ACTIVATIONS)}")
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.image_size = image_size
        self.patch_size = patch_size
        scale = dim ** -0.5
        self.patch_embedding = nn.Conv2d(3, dim, patch_size, stride=patch_size, bias=not pre_norm)
        self.cls_embedding = nn.Parameter(scale * torch.randn(1, 1, dim))
        self.pos_embedding = nn.Parameter(scale * torch.randn(1, 1 + (image_size // patch_size) ** 2, dim))
        self.pre_norm = LayerNorm(dim, eps=norm_eps, elementwise_affine=True) if pre_norm else None
        self.transformer = nn.Sequential(*(
            AttentionBlock(dim, mlp_ratio, num_heads, post_norm, activation, norm_eps) for _ in range(num_layers)))
        # The pooled-embedding head: unused for Wan's hidden states, kept so checkpoints load strictly
        # (out_dim=None for transformers CLIPVisionModel weights, which have no projection).
        self.post_norm = LayerNorm(dim, eps=norm_eps, elementwise_affine=True)
        if out_dim is not None:
            self.head = nn.Parameter(scale * torch.randn(dim, out_dim))

    def forward(self, images, interpolate_pos=False, skip_last_block=True):
        """images: normalized [B, 3, H, W] -> hidden states [B, 1 + (H/p)*(W/p), dim].

        interpolate_pos: resize the position grid to the image's patch grid, for inputs other
            than image_size; otherwise the patch count must match image_size.
        skip_last_block: return the penultimate block's output, as Wan does (official
            `use_31_block`); False runs every block.
        """
        x = self.patch_embedding(images.to(self.patch_embedding.weight.dtype))  # [B, C, h, w]
        grid = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_embedding.expand(len(x), -1, -1), x], dim=1)
        pos = self.pos_embedding
        if interpolate_pos:
            pos = interpolate_pos_embedding(pos, grid)
        elif x.shape[1] != pos.shape[1]:
            raise ValueError(f"{tuple(images.shape[-2:])} images give a {tuple(grid)} patch grid, but the position "
                             f"embedding has {pos.shape[1] - 1} patches; resize to {self.image_size} px or pass "
                             f"interpolate_pos=True")
        x = x + pos
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        blocks = self.transformer[:-1] if skip_last_block else self.transformer
        return blocks(x)


def visual_state_dict(state_dict):
    """The `visual.*` tensors of a full CLIP checkpoint with the prefix stripped, or the image tower
    of a transformers `CLIPVisionModel` checkpoint converted to our names.

    A checkpoint without any `visual.` key is taken to hold the image tower alone.
    """
    if is_hf_clip(state_dict):
        return clip_from_hf(state_dict)
    visual = {k[len("visual."):]: v for k, v in state_dict.items() if k.startswith("visual.")}
    return visual or state_dict


def load_clip_visual(path, dtype=torch.float32, device="cpu", **config):
    """Builds `VisionTransformer(**config)` on meta and fills it strictly from the visual keys at `path`
    (official open-clip layout, or transformers CLIPVisionModel layout: pass out_dim=None when
    that file has no `visual_projection`)."""
    model = load_model(lambda: VisionTransformer(**config), path, dtype=dtype, device=device,
                       convert=visual_state_dict)
    return model.eval().requires_grad_(False)


def preprocess_images(images, size=None):
    """Official CLIP preprocessing of images in [-1, 1].

    images: [B, 3, H, W], or a list of [3, F, H, W] clips whose F frames each become an image
        (the official call passes `[img[:, None]]`).
    size: bicubic resize to size x size (align_corners=False) first; None keeps the input size.
    Returns [B, 3, size, size] (or [B, 3, H, W]) in fp32, CLIP-normalized.
    """
    if isinstance(images, (list, tuple)):
        images = torch.cat([clip.transpose(0, 1) for clip in images])
    images = images.float()
    if size is not None:
        images = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False)
    mean = images.new_tensor(CLIP_MEAN)[:, None, None]
    std = images.new_tensor(CLIP_STD)[:, None, None]
    return (images * 0.5 + 0.5 - mean) / std


class CLIPImageEncoder:
    """Images in [-1, 1] -> CLIP tokens for the Wan I2V / FLF2V DiT ([B, 257, 1280] for ViT-H/14).

    Args:
        model: a loaded `VisionTransformer`.
        resize: resize inputs to the model's image_size (the official behaviour). With False the
            images keep their size and the position embedding is interpolated to their patch grid
            (e.g. 512x512 -> a 36x36 grid, 1297 tokens).
        output_device: where `encode` returns its tensors (default: the model's device).
    """

    def __init__(self, model, resize=True, output_device=None):
        self.model = model
        self.resize = resize
        self.output_device = output_device

    @classmethod
    def from_checkpoint(cls, checkpoint_path, dtype=None, device="cpu", resize=True, output_device=None, **config):
        """Loads the image tower from a full CLIP checkpoint; dtype defaults to fp16 on GPU, fp32 on CPU."""
        if dtype is None:
            dtype = torch.float32 if torch.device(device).type == "cpu" else torch.float16
        return cls(load_clip_visual(checkpoint_path, dtype, device, **config), resize, output_device)

    @property
    def device(self):
        return self.model.patch_embedding.weight.device

    def to(self, device):
        """Moves the model (e.g. to offload it between uses); returns self."""
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode(self, images):
        """images: [B, 3, H, W] or a list of [3, F, H, W] in [-1, 1] -> hidden states [B', L, dim]."""
        if isinstance(images, torch.Tensor):
            images = images.to(self.device)
        else:
            images = [clip.to(self.device) for clip in images]
        size = self.model.image_size if self.resize else None
        out = self.model(preprocess_images(images, size), interpolate_pos=not self.resize)
        return out.to(self.output_device or self.device)

    def __call__(self, images):
        return self.encode(images)
