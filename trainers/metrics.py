"""Training logs: a tqdm bar and log lines (loss, lr, grad norm, step time, tokens/s, memory),
every record in <logdir>/metrics.jsonl, and wandb when enabled and installed. Main rank only."""

import json
import logging
import resource
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

log = logging.getLogger("trainers")


def memory_gb(device):
    """Peak memory: allocated on the GPU, resident on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricLogger:
    def __init__(self, cfg, logdir, is_main, start_step):
        self.enabled = is_main
        self.every = cfg.logging.every
        self.wandb = None
        if not is_main:
            return
        self.file = open(Path(logdir) / "metrics.jsonl", "a")
        self.bar = tqdm(total=cfg.train.max_steps, initial=start_step, desc="train", dynamic_ncols=True)
        if cfg.logging.wandb:
            try:
                import wandb
            except ImportError:
                log.warning("logging.wandb is on but wandb is not installed; logging to metrics.jsonl only")
            else:
                self.wandb = wandb.init(project=cfg.logging.wandb_project, mode=cfg.logging.wandb_mode,
                                        dir=str(logdir), config=OmegaConf.to_container(cfg, resolve=True))

    def log(self, step, metrics):
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        self.bar.update(1)
        if step % self.every == 0:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
            log.info("step %d | " + " | ".join(f"{k} {v:.4g}" for k, v in metrics.items()), step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self):
        if self.enabled:
            self.bar.close()
            self.file.close()
            if self.wandb is not None:
                self.wandb.finish()
