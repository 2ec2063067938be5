"""The Wan diffusion transformer (DiT), one class for every Wan release.

t2v: text cross-attention only. i2v / flf2v (Wan2.1): condition channels `y` concatenated to the
latent and 257 (flf2v: 2 x 257) CLIP image tokens through `img_emb`, attended separately in
cross-attention. Wan2.2 A14B i2v: condition channels, no CLIP branch. ti2v (Wan2.2 5B): per-token
timesteps `t` [B, L]. Module and parameter names follow the official checkpoints.

Extension points (used by the variant models): `add_condition` tokens added after patch
embedding, and the separable stages `embed_tokens`, `embed_time`, `embed_context`, `run_blocks`,
`project_out` that a variant model composes instead of forking this file.
"""

import inspect
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import attention
from .norms import LayerNorm, RMSNorm
from .rope import apply_rope, grid_positions, rope_cos_sin
from .text_context import CrossContext, fold_padding

MODEL_TYPES = ("t2v", "i2v", "flf2v", "ti2v")
CLIP_TOKENS = 257
CLIP_DIM = 1280


def sinusoidal_embedding(dim, position):
    """[N] positions -> [N, dim] (cos, sin) embedding, computed in float64 as the official model."""
    half = dim // 2
    position = position.double()
    angles = torch.outer(position, torch.pow(10000.0, -torch.arange(half, device=position.device).double() / half))
    return torch.cat([angles.cos(), angles.sin()], dim=1).float()


def fp32_linear(layer, x):
    """Runs an nn.Linear in fp32 whatever its parameter dtype (time embedding, modulation, head)."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


def local_window_mask(length, window_size, device):
    """[L, L] bool mask of a token-local window (left, right); -1 means unbounded on that side."""
    left, right = window_size
    offset = torch.arange(length, device=device)[None, :] - torch.arange(length, device=device)[:, None]
    mask = torch.ones(length, length, dtype=torch.bool, device=device)
    if left >= 0:
        mask &= offset >= -left
    if right >= 0:
        mask &= offset <= right
    return mask


class AttentionProjections(nn.Module):
    """The q, k, v, o projections and the q/k RMSNorms that self- and cross-attention share."""

    def __init__(self, dim, num_heads, qk_norm=True, eps=1e-6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps=eps) if qk_norm else nn.Identity()


class SelfAttention(AttentionProjections):
    def __init__(self, dim, num_heads, window_size=(-1, -1), qk_norm=True, eps=1e-6):
        super().__init__(dim, num_heads, qk_norm, eps)
        self.window_size = tuple(window_size)

    def qkv(self, x, rope):
        """x [B, L, C] -> rotated q, k and v, each [B, L, H, D]."""
        heads = (self.num_heads, self.head_dim)
        q = self.norm_q(self.q(x)).unflatten(-1, heads)
        k = self.norm_k(self.k(x)).unflatten(-1, heads)
        v = self.v(x).unflatten(-1, heads)
        return apply_rope(q, *rope), apply_rope(k, *rope), v

    def forward(self, x, rope, attn_mask=None, kv_cache=None):
        """x [B, L, C], rope (cos, sin) [L, 1, D/2], attn_mask broadcastable to [B, H, L, L].
        kv_cache: this layer's cache of earlier frames (`kv_cache.LayerKVCache`, causal generation);
        it stores this call's rotated keys and values and attends over what it holds."""
        q, k, v = self.qkv(x, rope)
        return self.o(self.attend(q, k, v, attn_mask, kv_cache).flatten(2))

    def attend(self, q, k, v, attn_mask=None, kv_cache=None):
        """Rotated q, k, v [B, L, H, D] -> attention output [B, L, H, D]: the only step of a block that
        mixes tokens, so a wrapper may replace it on an instance (see `wan.distributed`)."""
        if kv_cache is not None:
            return kv_cache.attend(q, k, v)
        if self.window_size != (-1, -1):
            window = local_window_mask(q.shape[1], self.window_size, q.device)
            attn_mask = window if attn_mask is None else attn_mask & window
        return attention(q, k, v, attn_mask=attn_mask)


class CrossAttention(AttentionProjections):
    """Attention from video tokens to the text context, plus extra key/value branches whose results
    are added before the output projection. Each branch `name` owns `k_{name}`, `v_{name}` (and
    `norm_k_{name}`) and attends to `CrossContext.branches[name]` with the shared query: Wan2.1
    i2v/flf2v's CLIP branch is `img`; variant models add theirs with `add_branch` (e.g. an audio
    branch) and so keep the official key names without a forked attention class."""

    def __init__(self, dim, num_heads, qk_norm=True, eps=1e-6, image_branch=False):
        super().__init__(dim, num_heads, qk_norm, eps)
        self.branches = []
        self.eps = eps
        if image_branch:
            self.add_branch("img", key_norm=qk_norm)

    def add_branch(self, name, key_norm=True):
        """Adds the projections of a branch attending to `CrossContext.branches[name]`."""
        dim, like = self.q.in_features, dict(device=self.q.weight.device, dtype=self.q.weight.dtype)
        setattr(self, f"k_{name}", nn.Linear(dim, dim, **like))
        setattr(self, f"v_{name}", nn.Linear(dim, dim, **like))
        if key_norm:
            setattr(self, f"norm_k_{name}", RMSNorm(dim, eps=self.eps).to(**like))
        self.branches.append(name)

    @property
    def image_branch(self):
        return "img" in self.branches

    def context_kv(self, context):
        """Keys, values and logit biases of a `CrossContext`; cacheable across denoising steps.
        Returns a list of (k [B, Lc, H, D], v [B, Lc, H, D], bias or None): the text first, then
        each branch in `self.branches` order."""
        heads = (self.num_heads, self.head_dim)
        bias = None if context.text_bias is None else context.text_bias[:, None, None, :]
        kv = [(self.norm_k(self.k(context.text)).unflatten(-1, heads), self.v(context.text).unflatten(-1, heads), bias)]
        for name in self.branches:
            if name not in context.branches:
                raise ValueError(f"cross-attention branch '{name}' has no tokens in the context")
            tokens, mask = context.branches[name]
            k = getattr(self, f"k_{name}")(tokens)
            norm = getattr(self, f"norm_k_{name}", None)
            k = norm(k) if norm is not None else k
            kv.append((k.unflatten(-1, heads), getattr(self, f"v_{name}")(tokens).unflatten(-1, heads), mask))
        return kv

    def attend(self, x, kv):
        """x [B, L, C] attends to precomputed `context_kv` -> [B, L, C]."""
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, self.head_dim))
        out = None
        for k, v, mask in kv:
            mask = mask.to(q.dtype) if mask is not None and mask.is_floating_point() else mask
            branch = attention(q, k, v, attn_mask=mask)
            out = branch if out is None else out + branch
        return self.o(out.flatten(2))

    def forward(self, x, context):
        """x [B, L, C], context a `CrossContext` -> [B, L, C]."""
        return self.attend(x, self.context_kv(context))


class WanAttentionBlock(nn.Module):
    def __init__(self, dim, ffn_dim, num_heads, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True,
                 eps=1e-6, image_branch=False):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps)
        self.self_attn = SelfAttention(dim, num_heads, window_size, qk_norm, eps)
        self.norm3 = LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(dim, num_heads, qk_norm, eps, image_branch)
        self.norm2 = LayerNorm(dim, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def forward(self, x, e, rope, context, attn_mask=None, kv_cache=None, cross_kv=None):
        """
        x: [B, L, C] fp32 residual stream.  e: [B, L or 1, 6, C] fp32 time modulation.
        rope: (cos, sin) [L, 1, D/2].  context: `CrossContext` of embedded text (and image) tokens.
        kv_cache: self-attention cache of earlier frames (see `SelfAttention.forward`).
        cross_kv: `cross_attn.context_kv(context)` computed once per prompt; replaces `context`.
        """
        dtype = self.modulation.dtype  # the block's compute dtype (linear weights may be stored in fp8)
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation.float() + e).unbind(2)
        h = self.norm1.modulated(x, shift_sa, scale_sa).to(dtype)
        x = torch.addcmul(x, self.self_attn(h, rope, attn_mask, kv_cache).float(), gate_sa)
        h = self.norm3(x).to(dtype)
        x = x + (self.cross_attn(h, context) if cross_kv is None else self.cross_attn.attend(h, cross_kv)).float()
        h = self.norm2.modulated(x, shift_ff, scale_ff).to(dtype)
        return torch.addcmul(x, self.ffn(h).float(), gate_ff)


class Head(nn.Module):
    def __init__(self, dim, out_dim, patch_size, eps=1e-6):
        super().__init__()
        self.norm = LayerNorm(dim, eps)
        self.head = nn.Linear(dim, math.prod(patch_size) * out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim ** 0.5)

    def forward(self, x, e):
        """x [B, L, C] fp32, e [B, L or 1, C] fp32 -> [B, L, prod(patch) * out_dim] fp32."""
        shift, scale = (self.modulation.float() + e.unsqueeze(2)).unbind(2)
        return fp32_linear(self.head, self.norm.modulated(x, shift, scale))


class MLPProj(nn.Module):
    """Projects CLIP image tokens [B, 257 (x2 for flf2v), 1280] to the model width."""

    def __init__(self, in_dim, out_dim, flf_tokens=None):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(),
                                  nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim))
        if flf_tokens:  # first and last frame tokens get a learned position each
            self.emb_pos = nn.Parameter(torch.zeros(1, flf_tokens, in_dim))

    def forward(self, image_embeds):
        if hasattr(self, "emb_pos"):
            image_embeds = image_embeds.reshape(-1, self.emb_pos.shape[1], image_embeds.shape[-1]) + self.emb_pos
        return self.proj(image_embeds)


class WanModel(nn.Module):
    def __init__(self, model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=2048,
                 ffn_dim=8192, freq_dim=256, text_dim=4096, out_dim=16, num_heads=16, num_layers=32,
                 window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6, image_branch=None,
                 clip_dim=CLIP_DIM, clip_tokens=CLIP_TOKENS):
        """Constructor arguments are the official ones, plus: `image_branch` (CLIP tokens through
        `img_emb` and `k_img`/`v_img`), on by default for Wan2.1 i2v/flf2v and off for Wan2.2 A14B
        i2v; `clip_dim`/`clip_tokens`, the image encoder's width and tokens per image (ViT-H/14:
        1280 and 257; tiny test checkpoints use smaller encoders)."""
        super().__init__()
        if model_type not in MODEL_TYPES:
            raise ValueError(f"unknown model_type '{model_type}'; expected one of {MODEL_TYPES}")
        if image_branch is None:
            image_branch = model_type in ("i2v", "flf2v")
        self.model_type = model_type
        self.patch_size = tuple(patch_size)
        self.text_len = text_len
        self.in_dim = in_dim
        self.dim = dim
        self.freq_dim = freq_dim
        self.out_dim = out_dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads

        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList([
            WanAttentionBlock(dim, ffn_dim, num_heads, window_size, qk_norm, cross_attn_norm, eps, image_branch)
            for _ in range(num_layers)])
        self.head = Head(dim, out_dim, self.patch_size, eps)
        if image_branch:
            self.img_emb = MLPProj(clip_dim, dim, flf_tokens=2 * clip_tokens if model_type == "flf2v" else None)
        self.gradient_checkpointing = [False] * num_layers
        self._rope_cache = {}

    @classmethod
    def from_config(cls, config):
        """Builds from a config dict (e.g. an official `config.json`), ignoring foreign keys."""
        accepted = inspect.signature(cls.__init__).parameters
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in accepted}
        return cls(**kwargs)

    @property
    def image_branch(self):
        return hasattr(self, "img_emb")

    @property
    def dtype(self):
        return self.patch_embedding.weight.dtype

    @property
    def device(self):
        return self.patch_embedding.weight.device

    def set_gradient_checkpointing(self, enabled=True, every=1):
        """Recompute the activations of every `every`-th block in backward."""
        self.gradient_checkpointing = [enabled and i % every == 0 for i in range(len(self.blocks))]

    # -- stages ---------------------------------------------------------------------------------

    def embed_tokens(self, x):
        """x [B, in_dim, F, H, W] -> tokens [B, L, C] fp32 and the token grid (f, h, w)."""
        if x.ndim != 5:
            raise ValueError(f"x must be [B, C, F, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_dim:
            raise ValueError(f"model expects {self.in_dim} input channels (latent + y), got {x.shape[1]}; "
                             f"i2v/flf2v/ti2v-style models need the condition `y`")
        bad = [s for s, p in zip(x.shape[2:], self.patch_size) if s % p]
        if bad:
            raise ValueError(f"latent grid {tuple(x.shape[2:])} is not divisible by patch size {self.patch_size}")
        tokens = self.patch_embedding(x.to(self.dtype))
        grid = tuple(tokens.shape[2:])
        # Contiguous [B, L, C]: a transposed view would make every later residual and norm strided.
        return tokens.flatten(2).transpose(1, 2).float().contiguous(), grid

    def rope(self, grid, device, frame_offset=0):
        """Cached (cos, sin) for a token grid, [L, 1, D/2] each."""
        key = (grid, frame_offset, str(device))
        if key not in self._rope_cache:
            positions = grid_positions(*grid, frame_offset=frame_offset, device=device)
            self._rope_cache[key] = rope_cos_sin(positions, self.head_dim)
        return self._rope_cache[key]

    def embed_time(self, t, num_tokens):
        """t [B] or [B, L] -> (e [B, L or 1, C], e0 [B, L or 1, 6, C]), both fp32."""
        if t.ndim == 1:
            t = t[:, None]
        elif t.ndim != 2 or t.shape[1] != num_tokens:
            raise ValueError(f"t must be [B] or [B, {num_tokens}] (one per token), got {tuple(t.shape)}")
        freqs = sinusoidal_embedding(self.freq_dim, t.flatten()).unflatten(0, t.shape)
        e = fp32_linear(self.time_embedding[2], F.silu(fp32_linear(self.time_embedding[0], freqs)))
        e0 = fp32_linear(self.time_projection[1], F.silu(e)).unflatten(-1, (6, self.dim))
        return e, e0

    def embed_context(self, context, clip_fea=None):
        """Text context [B, Lt <= text_len, text_dim] (or a list of [Lt_i, text_dim]) with the
        official zero padding to `text_len` (folded, see `text_context`), and CLIP image features
        [B, 257 (x2 for flf2v), 1280] -> `CrossContext`."""
        tokens, bias = fold_padding(context, self.text_len)
        context = CrossContext(self.text_embedding(tokens.to(self.dtype)), bias)
        if not self.image_branch:
            if clip_fea is not None:
                raise ValueError(f"clip_fea given, but this {self.model_type} model has no CLIP image branch")
            return context
        if clip_fea is None:
            raise ValueError(f"{self.model_type} model needs CLIP image features `clip_fea` [B, 257, 1280]")
        context.branches["img"] = (self.img_emb(clip_fea.to(self.dtype)), None)
        return context

    def run_blocks(self, x, e0, rope, context, attn_mask=None, after_block=None):
        """Runs the blocks over tokens x [B, L, C]. `after_block(i, x) -> x`, if given, runs after
        block i: the hook of variant models that add per-layer residuals (VACE hints, audio
        injectors, face adapters) without forking the block loop."""
        for i, (block, ckpt) in enumerate(zip(self.blocks, self.gradient_checkpointing)):
            if ckpt and torch.is_grad_enabled():
                x = checkpoint(block, x, e0, rope, context, attn_mask, use_reentrant=False)
            else:
                x = block(x, e0, rope, context, attn_mask)
            if after_block is not None:
                x = after_block(i, x)
        return x

    def project_out(self, x, e, grid):
        """Tokens [B, L, C] -> [B, out_dim, F, H, W] fp32."""
        return self.unpatchify(self.head(x, e), grid)

    def unpatchify(self, x, grid):
        """x [B, L, pt*ph*pw*c] -> [B, c, f*pt, h*ph, w*pw]."""
        f, h, w = grid
        pt, ph, pw = self.patch_size
        x = x[:, :f * h * w].reshape(x.shape[0], f, h, w, pt, ph, pw, self.out_dim)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape[0], self.out_dim, f * pt, h * ph, w * pw)

    def forward(self, x, t, context, *, y=None, clip_fea=None, add_condition=None):
        """
        x: [B, C, F, H, W] noisy latents.  t: [B] or [B, L] (per-token, Wan2.2 TI2V) timesteps.
        context: [B, Lt, text_dim] text embeddings (or a list of [Lt_i, text_dim]).
        y: [B, Cy, F, H, W] condition channels concatenated to x (i2v / flf2v / A14B i2v).
        clip_fea: [B, 257, 1280] CLIP tokens ([2B, 257, 1280] first/last frame for flf2v).
        add_condition: [B, L, dim] tokens added after patch embedding (pose and other controls).
        Returns [B, out_dim, F, H, W] fp32.
        """
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        tokens, grid = self.embed_tokens(x)
        if add_condition is not None:
            tokens = tokens + add_condition.float()
        e, e0 = self.embed_time(t, tokens.shape[1])
        context = self.embed_context(context, clip_fea)
        tokens = self.run_blocks(tokens, e0, self.rope(grid, tokens.device), context)
        return self.project_out(tokens, e, grid)
