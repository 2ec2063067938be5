"""Distillation of a bidirectional many-step Wan teacher into a causal few-step student trained on its
own rollouts (Self-Forcing): score distillation (DMD, SiD) and an adversarial (GAN) variant.

Networks: the generator (the causal student, `model.*`, best started from ODE regression:
trainers/ode.py); the frozen teacher `real_score` (`distill.real_score`, guided with
`guidance_scale` against the negative prompt); and the critic (`distill.fake_score`): for
`score_distillation` the fake score, a Wan DiT trained with the denoising loss on generator samples,
for `gan` a Wan DiT with a discriminator head. The generator makes its videos with a rollout
(trainers/rollout.py: self_forcing, or the diffusion/teacher forcing baselines).

Optimizer steps take turns: with `dfake_gen_update_ratio` r, step s trains the generator when
s % (r + 1) == 0 and the critic otherwise (r critic updates per generator update), each with its own
AdamW settings (generator: `optimizer.*`; critic: `distill.lr_critic`, `beta1_critic`, `beta2_critic`).

Losses, with x the generator's x0 video, x_t = (1 - sigma) x + sigma * noise at a shifted uniform
timestep (clamped to `score_timestep_range`), and real / fake the two scores' x0 predictions there:
- DMD (Yin et al. 2024): grad = (fake - real) / mean|x - real| (per sample), loss 0.5 ||x - sg(x - grad)||^2,
  whose gradient in x is grad: the difference of the two scores, normalized.
- SiD (Zhou et al. 2024): mean((real - fake) * ((real - x) - alpha (real - fake))) / mean|x - real|, with
  the gradient through x_t and both scores too.
- critic: flow matching of the fake score on generator samples, ||fake_flow(x_t) - (noise - x)||^2.
- GAN: non-saturating, softplus(-D(fake_t)) for the generator, softplus(-D(real_t)) + softplus(D(fake_t))
  (+ an R1 penalty by finite differences) for the discriminator; real videos are the data's clean
  latents (e.g. the teacher's ODE endpoints, scripts/generate_ode_pairs.py).

The method classes (`ScoreDistillation`, `AdversarialDistillation`) take any networks called as
`net(x, t, context) -> flow`; the registered trainers build them from a config.
"""

import json
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from wan.checkpoint import save_state_dict
from wan.configs import get_preset
from wan.configs.preset import NEGATIVE_PROMPT
from wan.model_loading import load_dit
from wan.modules.model import WanModel
from wan.modules.text_encoder import T5TextEncoder
from wan.samplers import flow_to_x0, shift_sigma
from wan.samplers.schedule import per_sample_view

from . import register_trainer
from .config import DTYPES, dit_config, model_problems
from .rollout import (DISTILL_DEFAULTS, DISTILL_OPEN_MAPS, ROLLOUTS, CausalGenerator, rollout_from_config,
                      schedule_problems)

log = logging.getLogger(__name__)
DISTRIBUTION_LOSSES = ("dmd", "sid")


@dataclass
class DistillInputs:
    context: list          # text context: [L_i, text_dim] per sample, or a tensor [B, L, text_dim]
    negative: list         # the negative prompt's context likewise, or None (no guidance)
    shape: tuple           # [B, C, F, h, w] of the videos
    clean: torch.Tensor = None  # [B, C, F, h, w] clean latents of the data, when it has them


def sample_dims(x):
    return tuple(range(1, x.ndim))


def join(a, b):
    """Two batches of text context as one (lists of [L_i, text_dim], or tensors [B, L, text_dim])."""
    return torch.cat([a, b]) if torch.is_tensor(a) else list(a) + list(b)


def dmd_loss(x, real_x0, fake_x0):
    """DMD's generator loss and the mean |gradient| it applies to x (DMD eqs. 7-8)."""
    with torch.no_grad():
        grad = torch.nan_to_num((fake_x0 - real_x0) / (x - real_x0).abs().mean(dim=sample_dims(x), keepdim=True))
    return 0.5 * F.mse_loss(x, (x - grad).detach()), grad.abs().mean()


def sid_loss(x, real_x0, fake_x0, alpha):
    """SiD's generator loss; the gradient flows through x and through both predictions."""
    normalizer = (x - real_x0).abs().mean(dim=sample_dims(x), keepdim=True).detach()
    gap = real_x0 - fake_x0
    return torch.nan_to_num(gap * ((real_x0 - x) - alpha * gap) / normalizer).mean()


class ScoreTimesteps:
    """Timesteps at which a video is judged: uniform, shifted, clamped to `timestep_range`; and the
    flow-matching noising and x0 prediction there."""

    def __init__(self, shift=5.0, timestep_range=(20, 980), num_train_timesteps=1000):
        self.shift, self.range, self.num_train_timesteps = shift, tuple(timestep_range), num_train_timesteps

    def sample(self, batch_size, generator):
        u = torch.rand(batch_size, generator=generator, device=generator.device)
        return (shift_sigma(u, self.shift) * self.num_train_timesteps).clamp(*self.range)

    def sigma(self, t, like):
        return per_sample_view(t / self.num_train_timesteps, like)

    def add_noise(self, x, t, generator):
        """(x_t, noise) for clean x [B, ...] at timesteps t [B]."""
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        sigma = self.sigma(t, x)
        return (1 - sigma) * x + sigma * noise, noise

    def noised(self, x, generator):
        """(x_t, t [B], noise) for clean x at freshly drawn timesteps."""
        t = self.sample(x.shape[0], generator)
        x_t, noise = self.add_noise(x, t, generator)
        return x_t, t, noise

    def predict_x0(self, net, x_t, t, context, negative=None, guidance_scale=1.0):
        """x0 prediction of a flow model; classifier-free guided when given a negative context and a
        scale other than 1 (both branches in one batch)."""
        if negative is None or guidance_scale == 1:
            flow = net(x_t, t, context)
        else:
            cond, uncond = net(torch.cat([x_t, x_t]), torch.cat([t, t]), join(context, negative)).chunk(2)
            flow = uncond + guidance_scale * (cond - uncond)
        return flow_to_x0(flow.float(), x_t, self.sigma(t, x_t))


class Distillation:
    """A method's shared parts: the generator's `Rollout` and the `ScoreTimesteps` its judges use.
    Subclasses give generator_loss and critic_loss(generator_net, critic, inputs, generator) ->
    (loss, metrics)."""

    def __init__(self, rollout, timesteps=None):
        self.rollout = rollout
        self.timesteps = timesteps or ScoreTimesteps()

    def generate(self, generator_net, inputs, generator):
        return self.rollout(generator_net, inputs.context, inputs.shape, inputs.clean, generator=generator).video


class ScoreDistillation(Distillation):
    """DMD or SiD: the generator's rollouts judged by a frozen guided `real_score` against a fake
    score (the critic), which learns the rollouts' distribution by flow matching."""

    def __init__(self, rollout, real_score, distribution_loss="dmd", guidance_scale=1.0, sid_alpha=1.0,
                 timesteps=None):
        if distribution_loss not in DISTRIBUTION_LOSSES:
            raise ValueError(f"unknown distribution_loss '{distribution_loss}'; expected one of {DISTRIBUTION_LOSSES}")
        super().__init__(rollout, timesteps)
        self.real_score = real_score
        self.distribution_loss, self.guidance_scale, self.sid_alpha = distribution_loss, guidance_scale, sid_alpha

    def generator_loss(self, generator_net, critic, inputs, generator):
        x = self.generate(generator_net, inputs, generator)
        sid = self.distribution_loss == "sid"
        x_t, t, _ = self.timesteps.noised(x if sid else x.detach(), generator)
        with torch.set_grad_enabled(sid):
            real = self.timesteps.predict_x0(self.real_score, x_t, t, inputs.context, inputs.negative,
                                             self.guidance_scale)
            fake = self.timesteps.predict_x0(critic, x_t, t, inputs.context)
        if sid:
            return sid_loss(x, real, fake, self.sid_alpha), {}
        loss, grad_norm = dmd_loss(x, real, fake)
        return loss, {"dmd_grad": grad_norm.item()}

    def critic_loss(self, generator_net, critic, inputs, generator):
        with torch.no_grad():
            x = self.generate(generator_net, inputs, generator)
        x_t, t, noise = self.timesteps.noised(x, generator)
        return F.mse_loss(critic(x_t, t, inputs.context).float(), noise - x), {}


class Discriminator(nn.Module):
    """A Wan DiT as a feature extractor with a classification head (Self-Forcing's GAN critic): learned
    query tokens attend to the DiT's final tokens, an MLP turns each into a logit; forward -> [B] logits."""

    def __init__(self, dit, num_queries=4):
        super().__init__()
        dim = dit.dim
        self.model = dit
        self.queries = nn.Parameter(torch.randn(1, num_queries, dim) / dim ** 0.5)
        self.pool = nn.MultiheadAttention(dim, dit.num_heads, batch_first=True)
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))

    def forward(self, x, t, context):
        model = self.model
        tokens, grid = model.embed_tokens(x)
        _, e0 = model.embed_time(t, tokens.shape[1])
        features = model.run_blocks(tokens, e0, model.rope(grid, tokens.device), model.embed_context(context))
        features = features.to(self.queries.dtype)
        pooled, _ = self.pool(self.queries.expand(len(x), -1, -1), features, features, need_weights=False)
        return self.head(pooled).float().mean(dim=(1, 2))


class AdversarialDistillation(Distillation):
    """The generator's rollouts against the data's clean latents, told apart by a `Discriminator` at
    noise levels drawn as the scores' (Self-Forcing's GAN trainer)."""

    def __init__(self, rollout, g_weight=1.0, d_weight=1.0, r1_weight=0.0, r1_sigma=0.01, timesteps=None):
        super().__init__(rollout, timesteps)
        self.g_weight, self.d_weight, self.r1_weight, self.r1_sigma = g_weight, d_weight, r1_weight, r1_sigma

    def generator_loss(self, generator_net, critic, inputs, generator):
        x_t, t, _ = self.timesteps.noised(self.generate(generator_net, inputs, generator), generator)
        return F.softplus(-critic(x_t, t, inputs.context)).mean() * self.g_weight, {}

    def critic_loss(self, generator_net, critic, inputs, generator):
        with torch.no_grad():
            fake = self.generate(generator_net, inputs, generator)
        fake_t, t, _ = self.timesteps.noised(fake, generator)
        real_t, _ = self.timesteps.add_noise(inputs.clean.float(), t, generator)
        logits = critic(torch.cat([fake_t, real_t]), torch.cat([t, t]), join(inputs.context, inputs.context))
        fake_logit, real_logit = logits.chunk(2)
        loss = (F.softplus(-real_logit).mean() + F.softplus(fake_logit).mean()) * self.d_weight
        metrics = {"real_logit": real_logit.mean().item(), "fake_logit": fake_logit.mean().item()}
        if self.r1_weight:
            bumped = real_t + self.r1_sigma * torch.randn(real_t.shape, generator=generator, device=real_t.device)
            slope = (critic(bumped, t, inputs.context) - real_logit) / self.r1_sigma
            loss = loss + self.r1_weight * slope.square().mean()
        return loss, metrics


def load_or_init(section, config, dtype=torch.float32, device="cpu"):
    """The WanModel of a config section (preset, config, checkpoint): the checkpoint's weights, or a
    random init."""
    if section.checkpoint:
        return load_dit(section.checkpoint, config=config, dtype=dtype, device=device)
    return WanModel.from_config(config).to(device, dtype)


class DistillationTrainer:
    """What the score-distillation and GAN trainers share: the generator and the critic as one
    nn.ModuleDict trained in turns, the text context (umT5 online for prompt files, or the cached one
    of data.kind latents), the loss of each turn by a `Distillation` method, and the exports.
    Subclasses give build_critic(WanModel) -> the critic and build_method(rollout, timesteps)."""

    defaults = DISTILL_DEFAULTS
    open_maps = DISTILL_OPEN_MAPS
    ema_network = "generator"
    uses_teacher = False       # whether a frozen real_score judges the generator
    needs_real_videos = False  # whether the data must hold clean latents

    @classmethod
    def config_problems(cls, cfg):
        d = cfg.distill
        if cfg.data.kind not in ("prompts", "latents"):
            yield f"{cls.name} takes prompts (data.kind prompts) or cached latents (latents), not {cfg.data.kind}"
        if d.rollout not in ROLLOUTS:
            yield f"unknown distill.rollout '{d.rollout}'; expected one of {ROLLOUTS}"
        elif (d.rollout != "self_forcing" or cls.needs_real_videos) and cfg.data.kind != "latents":
            yield f"{cls.name} with rollout {d.rollout} needs clean latents of videos: set data.kind latents"
        if cls.needs_text_encoder(cfg) and None in (cfg.encoders.t5_checkpoint, cfg.encoders.t5_tokenizer):
            yield f"{cls.name} encodes prompts (data, negative prompt): set encoders.t5_checkpoint and t5_tokenizer"
        if cfg.lora.enabled:
            yield f"{cls.name} trains the whole generator; lora.enabled is not supported"
        if d.dfake_gen_update_ratio < 1:
            yield f"distill.dfake_gen_update_ratio must be >= 1, got {d.dfake_gen_update_ratio}"
        yield from schedule_problems(cfg)
        for key in ("real_score", "fake_score") if cls.uses_teacher else ("fake_score",):
            yield from model_problems(d[key], f"distill.{key}")

    @classmethod
    def needs_text_encoder(cls, cfg):
        return cfg.data.kind == "prompts" or (cls.uses_teacher and cfg.distill.guidance_scale != 1)

    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, device
        self.dit, self.critic_dit = dit_config(cfg.model), dit_config(cfg.distill.fake_score)
        with torch.device("meta"):
            generator = CausalGenerator(WanModel.from_config(self.dit), cfg.causal.num_frame_per_block,
                                        independent_first_frame=cfg.causal.independent_first_frame)
            critic = self.build_critic(WanModel.from_config(self.critic_dit))
        self.model = nn.ModuleDict({"generator": generator, "critic": critic})
        self.text_encoder = self.negative = None
        if self.needs_text_encoder(cfg):
            enc = cfg.encoders
            self.text_encoder = T5TextEncoder.from_checkpoint(
                enc.t5_checkpoint, enc.t5_tokenizer, self.dit.get("text_len", 512), DTYPES[enc.dtype], device,
                cache_size=0, **OmegaConf.to_container(enc.t5_config))
        d = cfg.distill
        if self.uses_teacher and d.guidance_scale != 1:  # the teacher's unconditional branch
            self.negative = self.text_encoder.encode(d.negative_prompt or NEGATIVE_PROMPT, device)[0]
        timesteps = ScoreTimesteps(d.timestep_shift, d.score_timestep_range, d.num_train_timestep)
        self.method = self.build_method(rollout_from_config(cfg), timesteps)

    # -- the loop's interface ---------------------------------------------------------------------

    def optimizer_settings(self, network):
        d = self.cfg.distill
        return {"lr": d.lr_critic, "betas": (d.beta1_critic, d.beta2_critic)} if network == "critic" else {}

    def phase(self, step):
        return "generator" if step % (self.cfg.distill.dfake_gen_update_ratio + 1) == 0 else "critic"

    def initial_state(self):
        state = {f"generator.model.{k}": v for k, v in load_or_init(self.cfg.model, self.dit).state_dict().items()}
        critic = self.build_critic(load_or_init(self.cfg.distill.fake_score, self.critic_dit))
        state.update({f"critic.{k}": v for k, v in critic.state_dict().items()})
        return state

    def frozen_modules(self):
        return [self.text_encoder.model] if self.text_encoder else []

    def export(self, state, folder, suffix=""):
        """`model{suffix}.safetensors` (the generator, official names) beside its `config.json`, for
        inference.py's causal configs; `critic.safetensors` with the critic's weights."""
        dtype = DTYPES[self.cfg.checkpoint.export_dtype]
        generator = {k.removeprefix("generator.").removeprefix("model."): v.to(dtype)
                     for k, v in state.items() if not k.startswith("critic.")}
        save_state_dict(generator, folder / f"model{suffix}.safetensors")
        (folder / "config.json").write_text(json.dumps(self.dit, indent=2))
        critic = {k.removeprefix("critic."): v.to(dtype) for k, v in state.items() if k.startswith("critic.")}
        if critic:
            save_state_dict(critic, folder / "critic.safetensors")

    def loss(self, batch, generator, phase):
        inputs = self.inputs(batch)
        turn = self.method.generator_loss if phase == "generator" else self.method.critic_loss
        loss, metrics = turn(self.model["generator"], self.model["critic"], inputs, generator)
        b, _, f, h, w = inputs.shape
        return loss, {"tokens": b * f * h * w // math.prod(self.model["generator"].model.patch_size[1:]), **metrics}

    # -- inputs -----------------------------------------------------------------------------------

    def inputs(self, batch):
        if "context" in batch:
            context = [c.to(self.device) for c in batch["context"]]
        else:
            context = self.text_encoder.encode(batch["text"], self.device)
        clean = batch["latents"].to(self.device, torch.float32) if "latents" in batch else None
        batch_size = len(context)
        shape = tuple(clean.shape) if clean is not None else (batch_size, self.dit["in_dim"], *self.latent_grid())
        negative = None if self.negative is None else [self.negative] * batch_size
        return DistillInputs(context, negative, shape, clean)

    def latent_grid(self):
        """(frames, h, w) of the latents of `data.num_frames` frames at data.height x data.width."""
        data = self.cfg.data
        stride = get_preset(self.cfg.model.preset).vae_stride if self.cfg.model.preset else (4, 8, 8)
        return ((data.num_frames - 1) // stride[0] + 1, data.height // stride[1], data.width // stride[2])


@register_trainer("score_distillation")
class ScoreDistillationTrainer(DistillationTrainer):
    uses_teacher = True

    @classmethod
    def config_problems(cls, cfg):
        yield from super().config_problems(cfg)
        if cfg.distill.distribution_loss not in DISTRIBUTION_LOSSES:
            yield (f"unknown distill.distribution_loss '{cfg.distill.distribution_loss}'; "
                   f"expected one of {DISTRIBUTION_LOSSES}")

    def build_critic(self, dit):
        return dit

    def build_method(self, rollout, timesteps):
        d = self.cfg.distill
        if d.real_score.checkpoint is None:
            log.warning("distill.real_score.checkpoint is null: the teacher has random weights")
        self.real_score = load_or_init(d.real_score, dit_config(d.real_score), DTYPES[self.cfg.model.frozen_dtype],
                                       self.device).eval().requires_grad_(False)
        if d.distribution_loss == "sid" and self.cfg.model.gradient_checkpointing:  # SiD backpropagates through it
            self.real_score.set_gradient_checkpointing(True)
        return ScoreDistillation(rollout, self.real_score, d.distribution_loss, d.guidance_scale, d.sid_alpha,
                                 timesteps)

    def frozen_modules(self):
        return [self.real_score] + super().frozen_modules()


@register_trainer("gan")
class GANTrainer(DistillationTrainer):
    needs_real_videos = True

    def build_critic(self, dit):
        return Discriminator(dit, self.cfg.distill.gan.num_queries)

    def build_method(self, rollout, timesteps):
        gan = self.cfg.distill.gan
        return AdversarialDistillation(rollout, gan.g_weight, gan.d_weight, gan.r1_weight, gan.r1_sigma, timesteps)
