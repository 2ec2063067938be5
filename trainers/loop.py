"""The training loop every trainer runs in.

One optimizer step consumes `train.total_batch_size` samples: micro-batches of `train.batch_size`
on each of the N processes, accumulated over total / (batch_size * N) forwards. Global micro-batch
g of step s is the same data and the same noise whatever N is (data order and the per-micro-batch
generator are functions of (seed, g)), so runs on 1 and 2 processes, and a resumed run, follow the
same loss curve.

A trainer of several networks (distillation: generator and critic) makes `model` an nn.ModuleDict of
them. Each is its own FSDP unit and its own AdamW parameter group (`trainer.optimizer_settings`), and
optimizer steps take turns: step s trains the network `trainer.phase(s)` names, through
`trainer.loss(batch, generator, phase)`, and no other; the EMA follows `trainer.ema_network`.
"""

import logging
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from omegaconf import OmegaConf

from wan.lora import parameter_report

from . import TRAINERS
from .checkpointing import Checkpointer
from .config import DTYPES
from .data import build_dataset, build_loader
from .ema import EMA
from .metrics import MetricLogger, memory_gb
from .parallelize import apply_activation_checkpointing, apply_fsdp, init_distributed, materialize

log = logging.getLogger("trainers")


def build_optimizer(params, cfg):
    """AdamW over `params` (tensors, or parameter groups with their own lr, betas, ...) with linear
    warmup to `cfg.lr` (to each group's lr)."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                  eps=cfg.eps)
    warmup = cfg.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
    return optimizer, scheduler


def micro_batch_seed(seed, g):
    return (seed * 1_000_003 + g) % 2**63


def train(cfg, logdir, resume=None):
    """Runs `cfg` (a validated config) writing to `logdir`. resume: a checkpoint folder, or "latest"
    (the newest in logdir, if any). Returns the metrics of every step run."""
    env = init_distributed()
    try:
        metrics = run(cfg, Path(logdir), resume, env)
        if env.owns_group and env.world_size > 1:
            # no rank tears its gloo connections down while another still writes the last checkpoint
            # (seen as an abort at exit)
            dist.barrier()
        return metrics
    finally:
        if env.owns_group:
            dist.destroy_process_group()


def run(cfg, logdir, resume, env):
    torch.manual_seed(cfg.seed + env.rank)
    if env.is_main:
        logdir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, logdir / "config.yaml")

    trainer = TRAINERS[cfg.trainer](cfg, env.device)
    model = trainer.model
    log.info("%s trainer: %s", cfg.trainer, parameter_report(model))
    if cfg.model.gradient_checkpointing:
        apply_activation_checkpointing(model)
    apply_fsdp(model, param_dtype=DTYPES[cfg.train.mixed_precision])
    materialize(model, trainer.initial_state() if env.is_main else None, env.device)
    if cfg.train.shard_frozen:
        for module in trainer.frozen_modules():
            apply_fsdp(module)
    turns = isinstance(model, nn.ModuleDict)  # several networks, trained in turns
    networks = dict(model.items()) if turns else {"model": model}
    groups = [{"name": name, "params": [p for p in network.parameters() if p.requires_grad],
               **(trainer.optimizer_settings(name) if turns else {})} for name, network in networks.items()]
    optimizer, scheduler = build_optimizer(groups, cfg.optimizer)
    ema_network = trainer.ema_network if turns else "model"
    ema = EMA(networks[ema_network], cfg.train.ema_weight, cfg.train.ema_start_step) \
        if cfg.train.ema_weight is not None else None
    checkpointer = Checkpointer(logdir / "checkpoints", env, trainer, optimizer, scheduler, ema,
                                cfg.checkpoint.keep_last)

    step = 0
    if resume == "latest":
        resume = checkpointer.latest()
        if resume is None:
            log.info("no checkpoint in %s yet; starting from scratch", logdir)
    if resume is not None:
        step = checkpointer.load(resume)

    micro_batches = cfg.train.total_batch_size // cfg.train.batch_size  # per step, all processes
    accumulation = micro_batches // env.world_size
    dataset = trainer.dataset() if hasattr(trainer, "dataset") else build_dataset(cfg.data, cfg.seed)
    loader = iter(build_loader(dataset, cfg.train.batch_size, cfg.seed, start=step * micro_batches + env.rank,
                               stride=env.world_size, num_workers=cfg.data.num_workers))
    logger = MetricLogger(cfg, logdir, env.is_main, step)
    history = []
    model.train()
    while step < cfg.train.max_steps:
        start = time.perf_counter()
        phase = trainer.phase(step) if turns else None
        totals = torch.zeros(2, dtype=torch.float64)  # loss sum, tokens
        extras = defaultdict(float)  # the trainer's other metrics, averaged over this process's micro-batches
        for micro in range(accumulation):
            batch = next(loader)
            g = step * micro_batches + micro * env.world_size + env.rank
            generator = torch.Generator(env.device).manual_seed(micro_batch_seed(cfg.seed, g))
            loss, metrics = trainer.loss(batch, generator, phase) if phase else trainer.loss(batch, generator)
            (loss / accumulation).backward()
            totals += torch.tensor([loss.item(), metrics.pop("tokens")], dtype=torch.float64)
            for key, value in metrics.items():
                extras[key] += value / accumulation
        params = []
        for group in optimizer.param_groups:  # other networks' gradients (e.g. SiD's critic) are dropped
            for p in group["params"]:
                if phase in (None, group["name"]):
                    params.append(p)
                else:
                    p.grad = None
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optimizer.grad_clip or float("inf"))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        lr = scheduler.get_last_lr()[list(networks).index(phase) if phase else 0]  # the trained network's
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if ema is not None and phase in (None, ema_network):
            ema.update(step)

        dist.all_reduce(totals)
        elapsed = time.perf_counter() - start
        record = {"loss": totals[0].item() / micro_batches, "lr": lr, "grad_norm": grad_norm.item(),
                  "step_time": elapsed, "tokens_per_s": totals[1].item() / elapsed,
                  "memory_gb": memory_gb(env.device), **extras}
        if phase:
            record[f"{phase}_loss"] = record["loss"]
        logger.log(step, record)
        history.append({"step": step, **record})
        if step % cfg.checkpoint.every == 0 or step == cfg.train.max_steps:
            checkpointer.save(step)
    logger.close()
    return history
