"""Pose training (UniAnimate-DiT recipe): flow matching with the pose video's tokens added after patch
embedding and the reference pose's features added to `y`; trains `pose_proj` (a DiT narrower than
the release's 5120-wide tokens, e.g. the 1.3B), the pose CNNs (`pose.train_cnn`) and, if asked, a LoRA
(`lora.enabled`, the release's targets are `wan.convert.unianimate.UNIANIMATE_LORA_TARGETS`) or the
whole DiT (`pose.train_dit`).

Data: cached latents (scripts/cache_latents.py) whose files also hold `pose_video` [3, F, H, W], the
rendered poses of the clip's frames in [0, 1] at the video size, and for a DiT with `y` (Wan2.1 I2V)
`ref_pose` [3, H, W], the reference frame's pose. Exports: `pose{suffix}.safetensors` (pose CNNs and
pose_proj under the released names; `inference.py --task pose[-causal]` reads it from the checkpoint
folder or the config's `pose_weights`) beside the DiT's LoRA or weights.
"""

from pathlib import Path

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from wan.checkpoint import save_state_dict
from wan.convert.unianimate import UNIANIMATE_TABLE, load_pose_encoder, merge_lora_state, read_unianimate
from wan.modules.pose import PoseEncoder

from . import register_trainer
from .config import DTYPES
from .diffusion import DiffusionTrainer

POSE_DEFAULTS = Path(__file__).resolve().parents[1] / "configs" / "pose_defaults.yaml"


class PoseConditionedWan(nn.Module):
    """A DiT and its `PoseEncoder` as one trainable module (state dict `dit.*`, `pose.*`).

    forward(x, t, context, clip_fea, pose_video, ref_pose, keep): x [B, C + Cy, F, h, w] with the `y`
    channels last, as `DiffusionTrainer.loss` builds it; the reference pose's features are added to
    those channels, the pose tokens after patch embedding; keep [B] (1 or 0) drops both per sample.
    """

    def __init__(self, dit, pose):
        super().__init__()
        self.dit = dit
        self.pose = pose

    def forward(self, x, t, context, clip_fea=None, *, pose_video, ref_pose=None, keep=None):
        tokens = self.pose.pose_tokens(pose_video)
        if keep is not None:
            tokens = tokens * keep[:, None, None].to(tokens.dtype)
        if ref_pose is not None:  # [B, Cy, 1, h, w], the same for every frame
            channels = self.dit.out_dim
            features = self.pose.randomref_embedding_pose(ref_pose).to(x.dtype)
            if keep is not None:
                features = features * keep[:, None, None, None, None].to(features.dtype)
            x = torch.cat([x[:, :channels], x[:, channels:] + features], dim=1)
        return self.dit(x, t, context, clip_fea=clip_fea, add_condition=tokens)


@register_trainer("pose")
class PoseTrainer(DiffusionTrainer):
    defaults = POSE_DEFAULTS

    @classmethod
    def config_problems(cls, cfg):
        yield from super().config_problems(cfg)
        if cfg.causal.enabled:
            yield ("the pose trainer trains the bidirectional model: set causal.enabled false (run the result "
                   "block by block with inference.py --task pose-causal)")
        if cfg.data.kind != "latents":
            yield ("the pose trainer reads cached latents that also hold pose_video (and ref_pose): "
                   "set data.kind to latents")
        for path in cfg.pose.weights:
            if not Path(path).exists():
                yield f"pose.weights: file not found: {path}"

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        dit = self.dit_model
        if not self.lora and not cfg.pose.train_dit:
            dit.requires_grad_(False).to(DTYPES[cfg.model.frozen_dtype])
        with torch.device("meta"):
            self.pose = PoseEncoder(dim=dit.dim, pose_dim=cfg.pose.pose_dim, ref_channels=dit.in_dim - dit.out_dim)
        self.pose.requires_grad_(cfg.pose.train_cnn)
        self.pose.pose_proj.requires_grad_(True)
        self.model = PoseConditionedWan(dit, self.pose)
        self.prefix = "dit."

    def initial_state(self):
        """The DiT's starting weights (with the LoRA of `pose.weights` merged), the pose modules from
        `pose.weights` or seeded fresh, and a fresh pose_proj where the files have none."""
        state = super().initial_state()
        pose = PoseEncoder(dim=self.dit_model.dim, pose_dim=self.cfg.pose.pose_dim,
                           ref_channels=self.dit_model.in_dim - self.dit_model.out_dim)
        weights = list(self.cfg.pose.weights)
        if weights:
            files, lora = read_unianimate(weights)
            fresh = {k: v for k, v in pose.state_dict().items() if k.startswith("pose_proj.") and k not in files}
            load_pose_encoder(pose, {**fresh, **files}, source=", ".join(weights))
            merge_lora_state(state, lora, prefix=self.prefix)
        if not self.lora and not self.cfg.pose.train_dit:  # stored as the frozen DiT is
            frozen = DTYPES[self.cfg.model.frozen_dtype]
            state = {k: v.to(frozen) if v.is_floating_point() else v for k, v in state.items()}
        state.update({f"pose.{k}": v for k, v in pose.state_dict().items()})
        return state

    def model_inputs(self, inputs, generator):
        if "pose_video" not in inputs:
            raise ValueError("the batch has no pose_video: add the rendered poses [3, F, H, W] in [0, 1] to every "
                             "cached latent file")
        kwargs = {"pose_video": inputs["pose_video"].to(self.device)}
        if self.pose.has_reference_pose:
            if "ref_pose" not in inputs:
                raise ValueError("the batch has no ref_pose: a DiT with `y` needs the reference frame's pose "
                                 "[3, H, W] in [0, 1] in every cached latent file")
            kwargs["ref_pose"] = inputs["ref_pose"].to(self.device)
        dropout = self.cfg.pose.condition_dropout
        if dropout:
            draw = torch.rand(len(kwargs["pose_video"]), generator=generator, device=self.device)
            kwargs["keep"] = (draw >= dropout).float()
        return kwargs

    def export(self, state, folder, suffix=""):
        """`pose{suffix}.safetensors` (released names) beside the DiT's trained weights, if any."""
        dtype = DTYPES[self.cfg.checkpoint.export_dtype]
        pose = {k[len("pose."):]: v.to(dtype) for k, v in state.items() if k.startswith("pose.")}
        save_state_dict(UNIANIMATE_TABLE.to_target(pose), Path(folder) / f"pose{suffix}.safetensors",
                        metadata={"config": OmegaConf.to_yaml(self.cfg.pose)})
        dit = {k: v for k, v in state.items() if k.startswith(self.prefix)}
        if dit:
            super().export(dit, folder, suffix)
