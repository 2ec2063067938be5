"""Wan2.1 VACE (all-in-one video creation and editing): the t2v DiT plus context blocks.

A VACE context (96 channels on the latent grid: 16 "inactive" + 16 "reactive" VAE latents and a
64-channel packed mask, see `wan.vace_context`) is patch-embedded by `vace_patch_embedding` and
run through `vace_blocks`, one full Wan block per entry of `vace_layers`. The first context block
adds `before_proj(c)` to the patch-embedded noisy latent; every context block emits a hint
`after_proj(c)`. Main block i in `vace_layers` is followed by `x += context_scale * hint`. All hints
are computed before the main stack, with the same time modulation, text context and RoPE.

`vace_layers` and `vace_in_dim` come from the checkpoint's config.json (1.3B: every second of 30
layers; 14B: [0, 5, ..., 35]); `vace_layers=None` means every second layer, the official default.
"""

import inspect

import torch.nn as nn

from .model import WanAttentionBlock, WanModel


class VaceBlock(WanAttentionBlock):
    """A Wan t2v block on the context tokens, with the projections that connect it to the main stack:
    `before_proj` (the first context block only) mixes in the noisy latent's tokens, `after_proj`
    makes the hint added after the matching main block."""

    def __init__(self, dim, ffn_dim, num_heads, window_size, qk_norm, cross_attn_norm, eps, first):
        super().__init__(dim, ffn_dim, num_heads, window_size, qk_norm, cross_attn_norm, eps)
        if first:
            self.before_proj = nn.Linear(dim, dim)
        self.after_proj = nn.Linear(dim, dim)

    def forward(self, c, x, e, rope, context):
        """c: context tokens [B, L, C] fp32; x: the noisy latent's patch-embedded tokens [B, L, C] fp32
        (used by the first block only). Returns (c for the next context block, hint [B, L, C] fp32)."""
        dtype = self.after_proj.weight.dtype
        if hasattr(self, "before_proj"):
            c = self.before_proj(c.to(dtype)).float() + x
        c = super().forward(c, e, rope, context)
        return c, self.after_proj(c.to(dtype)).float()


class VaceWanModel(WanModel):
    """WanModel (t2v) + VACE context blocks. Constructor arguments are WanModel's plus the official
    `vace_layers` (main-block indices that receive a hint; must contain 0) and `vace_in_dim`
    (context channels, 96 for the releases; None means `in_dim` as the official default)."""

    def __init__(self, vace_layers=None, vace_in_dim=None, model_type="vace", **kwargs):
        if model_type not in ("vace", "t2v"):
            raise ValueError(f"VaceWanModel extends the t2v model; got model_type '{model_type}'")
        super().__init__(model_type="t2v", **kwargs)
        num_layers = len(self.blocks)
        layers = list(range(0, num_layers, 2)) if vace_layers is None else [int(i) for i in vace_layers]
        if 0 not in layers or sorted(set(layers)) != layers or layers[-1] >= num_layers:
            raise ValueError(f"vace_layers must be increasing block indices in [0, {num_layers}) starting "
                             f"with 0 (before_proj sits on the layer-0 context block), got {vace_layers}")
        self.vace_layers = tuple(layers)
        self.vace_in_dim = self.in_dim if vace_in_dim is None else vace_in_dim
        defaults = inspect.signature(WanModel.__init__).parameters

        def arg(name):
            return kwargs.get(name, defaults[name].default)

        self.vace_blocks = nn.ModuleList([
            VaceBlock(self.dim, arg("ffn_dim"), self.num_heads, arg("window_size"), arg("qk_norm"),
                      arg("cross_attn_norm"), arg("eps"), first=n == 0)
            for n in range(len(layers))])
        self.vace_patch_embedding = nn.Conv3d(self.vace_in_dim, self.dim, kernel_size=self.patch_size,
                                              stride=self.patch_size)

    @classmethod
    def from_config(cls, config):
        """Builds from an official VACE `config.json` (WanModel's arguments + vace_layers, vace_in_dim)."""
        accepted = set(inspect.signature(WanModel.__init__).parameters) | {"vace_layers", "vace_in_dim"}
        accepted.discard("model_type")
        kwargs = {k: tuple(v) if isinstance(v, list) and k != "vace_layers" else v
                  for k, v in config.items() if k in accepted}
        return cls(**kwargs)

    def embed_vace_context(self, vace_context, grid):
        """vace_context [B, vace_in_dim, F, H, W] -> tokens [B, L, C] fp32 on the latent's token grid."""
        if vace_context.ndim != 5 or vace_context.shape[1] != self.vace_in_dim:
            raise ValueError(f"vace_context must be [B, {self.vace_in_dim}, F, H, W] (inactive + reactive latents "
                             f"and the packed mask, see wan.vace_context), got {tuple(vace_context.shape)}")
        tokens = self.vace_patch_embedding(vace_context.to(self.dtype))
        if tuple(tokens.shape[2:]) != tuple(grid):
            raise ValueError(f"vace_context covers the token grid {tuple(tokens.shape[2:])} but the latent's is "
                             f"{tuple(grid)}; both need the same frames (reference frames included) and size")
        return tokens.flatten(2).transpose(1, 2).float()

    def vace_hints(self, x, c, e0, rope, context):
        """x: noisy-latent tokens, c: context tokens, both [B, L, C] -> one hint [B, L, C] per vace layer."""
        hints = []
        for block in self.vace_blocks:
            c, hint = block(c, x, e0, rope, context)
            hints.append(hint)
        return hints

    def forward(self, x, t, context, *, vace_context, context_scale=1.0):
        """
        x: [B, 16, F, H, W] noisy latents (reference-image frames first).  t: [B] timesteps.
        context: [B, Lt, text_dim] text embeddings (or a list of [Lt_i, text_dim]).
        vace_context: [B, 96, F, H, W] (see `wan.vace_context.vace_context`).
        context_scale: weight of the hints (official default 1.0).
        Returns [B, 16, F, H, W] fp32.
        """
        tokens, grid = self.embed_tokens(x)
        c = self.embed_vace_context(vace_context, grid)
        e, e0 = self.embed_time(t, tokens.shape[1])
        context = self.embed_context(context)
        rope = self.rope(grid, tokens.device)
        hints = dict(zip(self.vace_layers, self.vace_hints(tokens, c, e0, rope, context)))

        def add_hint(i, x):
            return x + context_scale * hints[i] if i in hints else x

        tokens = self.run_blocks(tokens, e0, rope, context, after_block=add_hint)
        return self.project_out(tokens, e, grid)
