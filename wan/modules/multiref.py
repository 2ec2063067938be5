"""The Wan2.1 I2V DiT conditioned on several reference images (SkyReels-A2 / A3).

A2's transformer is Wan2.1-I2V-14B layer for layer: the references enter as the CLIP tokens of all
of them, concatenated (257 per reference, one softmax over all in the image branch of
cross-attention), and as reference latent frames in `y`. The only thing this wrapper adds is a
batch whose samples have different numbers of references: their tokens are zero-padded to the
longest and the padding is masked out of the image branch, so each sample sees exactly its own
references (as if it ran alone).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class ReferenceTokens:
    """CLIP tokens of each sample's references: tokens [B, Lmax, C] (zero-padded), lengths [B]."""
    tokens: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def from_list(cls, per_sample):
        """per_sample: B tensors [L_i, C] (each the concatenation of one sample's references)."""
        longest = max(t.shape[0] for t in per_sample)
        tokens = torch.stack([nn.functional.pad(t, (0, 0, 0, longest - t.shape[0])) for t in per_sample])
        return cls(tokens, torch.tensor([t.shape[0] for t in per_sample]))

    def to(self, device):
        return ReferenceTokens(self.tokens.to(device), self.lengths)

    def repeat(self, times):
        """The batch repeated `times` times (classifier-free guidance runs conditional and unconditional)."""
        return ReferenceTokens(self.tokens.repeat(times, 1, 1), self.lengths.repeat(times))

    def key_mask(self):
        """[B, 1, 1, Lmax] bool, True on real tokens; None when no sample is padded."""
        if bool((self.lengths == self.tokens.shape[1]).all()):
            return None
        positions = torch.arange(self.tokens.shape[1], device=self.tokens.device)
        return (positions[None] < self.lengths.to(self.tokens.device)[:, None])[:, None, None, :]


class MultiReferenceDiT(nn.Module):
    """A Wan2.1 i2v `WanModel` (in `self.model`, official key names under `model.`) that takes
    `ReferenceTokens` as its CLIP features."""

    def __init__(self, model):
        super().__init__()
        if not model.image_branch:
            raise ValueError("multi-reference conditioning needs a DiT with the CLIP image branch (Wan2.1 i2v)")
        self.model = model

    def forward(self, x, t, context, clip_fea=None, y=None):
        """x: [B, C, F, H, W] noisy latents (+ `y` [B, 20, F, H, W] mask and reference latents, or
        already concatenated into x). t: [B]. context: [B, Lt, text_dim] or a list of [Lt_i, text_dim].
        clip_fea: `ReferenceTokens`, or a [B, L, clip_dim] tensor when every sample has as many.
        Returns [B, out_dim, F, H, W] fp32."""
        model = self.model
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        if isinstance(clip_fea, torch.Tensor):
            clip_fea = ReferenceTokens(clip_fea, torch.full((len(clip_fea),), clip_fea.shape[1]))
        tokens, grid = model.embed_tokens(x)
        e, e0 = model.embed_time(t, tokens.shape[1])
        cross = model.embed_context(context, clip_fea.tokens)
        cross.branches["img"] = (cross.branches["img"][0], clip_fea.key_mask())
        tokens = model.run_blocks(tokens, e0, model.rope(grid, tokens.device), cross)
        return model.project_out(tokens, e, grid)
