"""Training checkpoints for exact resume, plus safetensors exports for inference, written atomically.

    <logdir>/checkpoints/step_000100/
        state/              torch.distributed.checkpoint (sharded): trainable weights (fp32), optimizer, EMA
        trainer_state.pt    step and lr scheduler
        rng_rank<r>.pt      each process's RNG states
        model.safetensors, model_ema.safetensors, config.json    (full fine-tuning; load_dit reads them)
        lora.safetensors, lora_ema.safetensors                   (LoRA; ComfyUI/diffusers format)
    <logdir>/checkpoints/latest    name of the newest complete checkpoint

A checkpoint is written under `step_N.tmp` and renamed when complete, so a crash mid-save leaves
every earlier checkpoint (and `latest`) intact. The data position needs no state of its own: the
data order is a function of the step (trainers/data.py).
"""

import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.tensor import DTensor

log = logging.getLogger(__name__)
TRAINABLE_ONLY = StateDictOptions(ignore_frozen_params=True, strict=False)


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def gather_full(tensors, is_main):
    """{name: DTensor or tensor} -> full CPU tensors on the main rank ({} elsewhere), one at a time."""
    out = {}
    for name, value in tensors.items():
        full = value.full_tensor() if isinstance(value, DTensor) else value
        if is_main:
            out[name] = full.detach().cpu()
    return out


def _write_text_atomic(path, text):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Checkpointer:
    def __init__(self, folder, env, trainer, optimizer, scheduler, ema=None, keep_last=None):
        self.folder = Path(folder)
        self.env, self.trainer, self.optimizer, self.scheduler, self.ema = env, trainer, optimizer, scheduler, ema
        self.keep_last = keep_last

    def _state(self):
        model, optimizer = get_state_dict(self.trainer.model, self.optimizer, options=TRAINABLE_ONLY)
        state = {"model": model, "optimizer": optimizer}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def latest(self):
        """The newest complete checkpoint folder, or None."""
        pointer = self.folder / "latest"
        return self.folder / pointer.read_text().strip() if pointer.exists() else None

    def save(self, step):
        final = self.folder / f"step_{step:06d}"
        tmp = final.with_name(final.name + ".tmp")
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-save
            tmp.mkdir(parents=True)
        dist.barrier()
        dcp.save(self._state(), checkpoint_id=str(tmp / "state"))
        torch.save(rng_state(), tmp / f"rng_rank{self.env.rank}.pt")
        weights = get_model_state_dict(self.trainer.model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
        buffers = {name for name, _ in self.trainer.model.named_buffers()}
        weights = {k: v for k, v in weights.items() if k not in buffers}  # buffers (e.g. fp8 scales) are not weights
        ema = gather_full(self.ema.state_dict(), self.env.is_main) if self.ema is not None else None
        if self.env.is_main:
            self.trainer.export(weights, tmp)
            if ema is not None:
                self.trainer.export(ema, tmp, suffix="_ema")
            torch.save({"step": step, "scheduler": self.scheduler.state_dict()}, tmp / "trainer_state.pt")
            if final.exists():  # the same step saved by an earlier run: move it aside, drop it once replaced
                old = final.with_name(final.name + ".old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old)
            else:
                os.replace(tmp, final)
            _write_text_atomic(self.folder / "latest", final.name)
            self._prune()
            log.info("saved checkpoint %s", final)
        dist.barrier()
        return final

    def _prune(self):
        if self.keep_last is None:
            return
        done = sorted(p for p in self.folder.glob("step_*") if p.is_dir() and p.suffix == "")
        for old in done[:-self.keep_last]:
            shutil.rmtree(old)

    def load(self, path):
        """Restores weights, optimizer, EMA, scheduler and RNG from checkpoint `path`; returns its step."""
        path = Path(path)
        state = self._state()
        dcp.load(state, checkpoint_id=str(path / "state"))
        set_state_dict(self.trainer.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=TRAINABLE_ONLY)
        trainer_state = torch.load(path / "trainer_state.pt", weights_only=False)
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        rng = path / f"rng_rank{self.env.rank}.pt"
        if rng.exists():
            set_rng_state(torch.load(rng, weights_only=False))
        else:
            log.warning("%s has no RNG state for rank %d (saved with fewer processes); dropout differs",
                        path, self.env.rank)
        log.info("resumed from %s at step %d", path, trainer_state["step"])
        return trainer_state["step"]
