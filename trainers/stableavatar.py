"""StableAvatar audio-adapter training (the reference's train_1B_square.py recipe) in the shared loop.

Flow matching on the i2v model as `diffusion` (the clip's first frame is the condition `y` and the
CLIP image), with the clip's audio through wav2vec2 (normalised over the clip) and the vocal
projector. Per micro-batch:
- audio dropout: each sample's wav2vec2 features are zeroed with probability `audio_dropout` (0.1);
- clip-level audio modelling with probability `clip_level_prob` (0.3): every video token attends
  every audio token instead of its own frame's;
- the face/lip-weighted loss: u ~ U(0, 1); u < 0.4: MSE x (1 + face + lip); 0.4 <= u < 0.5:
  MSE x face; u >= 0.5: MSE x lip; masks resized to the latent grid; plain MSE for samples without masks.
Trained: `blocks.*` and `vocal_projector.*` (the reference trains every name with vocal/audio/attn/
blocks); frozen: patch, text and time embeddings, head, img_emb. The starting checkpoint may be a
StableAvatar DiT or its base (Wan2.1-Fun-1.3B-InP): then the 160 audio keys start fresh (zero
k_vocal/v_vocal, a seeded random projector).
"""

from pathlib import Path

import torch
import torch.nn.functional as F

from wan.audio import Wav2Vec2Features
from wan.checkpoint import CheckpointError, read_state_dict
from wan.model_loading import save_dit
from wan.modules.stableavatar import StableAvatarModel

from . import register_trainer
from .avatar_data import AvatarVideoDataset
from .config import DTYPES, dit_config, probability_problems
from .diffusion import DiffusionTrainer
from .encoders import Encoders

DEFAULTS = Path(__file__).resolve().parents[1] / "configs" / "stableavatar_defaults.yaml"
TRAINED = ("blocks.", "vocal_projector.")
AUDIO_KEYS = ("cross_attn.k_vocal.", "cross_attn.v_vocal.", "vocal_projector.")


def mask_weights(face, lip, has_masks, grid, u):
    """Loss weights [B, 1, F, h, w] of the reference schedule for draw u, 1 where a sample has no masks.
    face, lip: [B, 1, H, W] in [0, 1]; grid: the latent (F, h, w)."""
    face, lip = (F.interpolate(m[:, :, None].float(), size=grid, mode="trilinear", align_corners=False)
                 for m in (face, lip))
    weight = 1 + face + lip if u < 0.4 else face if u < 0.5 else lip
    return torch.where(has_masks.reshape(-1, 1, 1, 1, 1), weight, torch.ones_like(weight))


@register_trainer("stableavatar")
class StableAvatarTrainer(DiffusionTrainer):
    defaults = DEFAULTS

    @classmethod
    def config_problems(cls, cfg):
        if cfg.data.kind != "videos":
            yield "the stableavatar trainer reads talking videos with their audio: set data.kind to videos"
        for key in ("vae_checkpoint", "t5_checkpoint", "t5_tokenizer", "clip_checkpoint"):
            if cfg.encoders[key] is None:
                yield f"the stableavatar trainer encodes video online: set encoders.{key}"
        if cfg.avatar.wav2vec is None or not (Path(cfg.avatar.wav2vec) / "config.json").is_file():
            yield f"avatar.wav2vec must be a wav2vec2 folder (facebook/wav2vec2-base-960h), got {cfg.avatar.wav2vec}"
        if cfg.lora.enabled or cfg.causal.enabled:
            yield "the stableavatar trainer trains the audio adapter and blocks fully: disable lora and causal"
        yield from probability_problems(cfg.avatar, "avatar", ("audio_dropout", "clip_level_prob"))
        d = cfg.diffusion
        if d.timestep_sampling not in ("uniform", "logit_normal"):
            yield f"diffusion.timestep_sampling must be uniform or logit_normal, got '{d.timestep_sampling}'"

    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, device
        self.dit = {**dit_config(cfg.model), "model_type": "i2v"}
        self.lora, self.causal, self.prefix = False, False, ""
        with torch.device("meta"):
            self.dit_model = StableAvatarModel.from_config(self.dit)
        for name, p in self.dit_model.named_parameters():
            p.requires_grad_(name.startswith(TRAINED))
        self.model = self.dit_model
        self.encoders = Encoders(cfg, self.dit, device)
        self.wav2vec = Wav2Vec2Features.from_folder(cfg.avatar.wav2vec, device=device)

    def dataset(self):
        data = self.cfg.data
        return AvatarVideoDataset.from_folder(data.path, num_frames=data.num_frames, frame_stride=data.frame_stride,
                                              height=data.height, width=data.width,
                                              buckets=[tuple(b) for b in data.buckets], seed=self.cfg.seed)

    def initial_state(self):
        """The checkpoint's weights (a base i2v checkpoint gets fresh audio keys), else a seeded init."""
        torch.manual_seed(self.cfg.seed)
        model = StableAvatarModel.from_config(self.dit)
        if self.cfg.model.checkpoint:
            state = read_state_dict(self.cfg.model.checkpoint)
            expected = model.state_dict()
            unexpected = sorted(set(state) - set(expected))
            missing = sorted(k for k in set(expected) - set(state) if not any(a in k for a in AUDIO_KEYS))
            if unexpected or missing:
                raise CheckpointError(f"{self.cfg.model.checkpoint} is neither a StableAvatar DiT nor its i2v base: "
                                      f"missing {missing[:5]}, unexpected {unexpected[:5]}")
            model.load_state_dict(state, strict=False)
        state = model.state_dict()
        # the frozen weights never change: kept (rank 0, which exports) to complete the exports
        self.frozen = {k: v for k, v in state.items() if not k.startswith(TRAINED)}
        return state

    def export(self, state, folder, suffix=""):
        dtype = DTYPES[self.cfg.checkpoint.export_dtype]
        """The whole DiT (the loop gathers the trained weights; the frozen ones are the start's) as
        `model{suffix}.safetensors` + `config.json`, loadable by the `avatar` inference task."""
        state = {**self.frozen, **state}
        save_dit(folder, {k: v.to(dtype) for k, v in state.items()}, self.dit, "StableAvatarModel",
                 f"model{suffix}.safetensors")

    def loss(self, batch, generator):
        inputs = self.encoders(batch)
        x0 = inputs["latents"].to(self.device, torch.float32)
        batch_size = x0.shape[0]
        audio = torch.cat([self.wav2vec.last_hidden_state(a) for a in batch["audio"]]).float()
        keep = torch.rand(batch_size, generator=generator, device=self.device) >= self.cfg.avatar.audio_dropout
        audio = audio * keep[:, None, None]
        clip_level = torch.rand((), generator=generator, device=self.device).item() < self.cfg.avatar.clip_level_prob
        noise = torch.randn(x0.shape, generator=generator, device=self.device)
        sigma = self.sample_sigmas((batch_size,), generator)
        s = sigma[:, None, None, None, None]
        pred = self.model((1 - s) * x0 + s * noise, sigma * 1000, inputs["context"], y=inputs["y"].to(self.device),
                          clip_fea=inputs["clip_fea"].to(self.device), audio=audio, clip_level=clip_level)
        error = (pred.float() - (noise - x0)).square()
        u = torch.rand((), generator=generator, device=self.device).item()
        weight = mask_weights(batch["face_mask"].to(self.device), batch["lip_mask"].to(self.device),
                              batch["has_masks"].to(self.device), x0.shape[2:], u)
        tokens = x0[0, 0].numel() // 4 * batch_size
        # `mse`, unweighted, is comparable across steps (the weighted loss jumps with u)
        return (error * weight).mean(), {"tokens": tokens, "mse": error.mean().item(),
                                         "audio_kept": keep.float().mean().item(), "clip_level": float(clip_level)}
