"""Exact resume: a run killed after its step-k checkpoint and resumed to 2k matches an uninterrupted
2k-step run (losses, weights, EMA); a crash mid-save leaves the previous checkpoint usable."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from test_train import TINY, losses, run_train_cli

pytestmark = pytest.mark.usefixtures("single_thread")
from trainers.checkpointing import Checkpointer
from trainers.config import load_config
from trainers.loop import train
from wan.checkpoint import read_state_dict

K = 4


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """Eight structured "latent videos": a bright block on a dark background, position per sample."""
    folder = tmp_path_factory.mktemp("latents")
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        x = torch.full((16, 2, 4, 4), -0.5)
        x[:, :, i % 3:i % 3 + 2, i % 2:i % 2 + 2] = 1.0
        save_file({"latents": x, "context": torch.randn(3 + i % 2, 32, generator=g)},
                  str(folder / f"{i:03d}.safetensors"), metadata={"text": f"sample {i}"})
    return folder


def config(latents, *overrides):
    return load_config(TINY, [f"data.path={latents}", f"checkpoint.every={K}", "lora.dropout=0.0", *overrides])


@pytest.fixture(scope="module")
def uninterrupted(latents, tmp_path_factory):
    logdir = tmp_path_factory.mktemp("uninterrupted")
    train(config(latents, f"train.max_steps={2 * K}"), logdir)
    return logdir


def assert_same_final_weights(a, b):
    for name in ("model.safetensors", "model_ema.safetensors"):
        ours, theirs = (read_state_dict(Path(run) / "checkpoints" / f"step_{2 * K:06d}" / name) for run in (a, b))
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], atol=0, rtol=0, msg=f"{name}: {key}")


def test_resume_after_kill_matches_uninterrupted_run(latents, uninterrupted, tmp_path):
    # A long run, killed as soon as its step-K checkpoint is complete.
    proc = run_train_cli(["--config_path", TINY, "--logdir", tmp_path, f"data.path={latents}",
                          f"checkpoint.every={K}", "train.max_steps=1000"])
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if f"saved checkpoint {tmp_path / 'checkpoints' / f'step_{K:06d}'}" in line:
            proc.kill()
            break
    proc.wait(timeout=60)
    assert proc.returncode == -9, "".join(lines[-40:])
    checkpoint = tmp_path / "checkpoints" / f"step_{K:06d}"
    assert checkpoint.is_dir()

    train(config(latents, f"train.max_steps={2 * K}"), tmp_path, resume=checkpoint)
    resumed, reference = losses(tmp_path), losses(uninterrupted)
    assert [resumed[s] for s in range(1, 2 * K + 1)] == [reference[s] for s in range(1, 2 * K + 1)]
    assert_same_final_weights(tmp_path, uninterrupted)


def test_resume_crash_mid_save_keeps_previous_checkpoint(latents, uninterrupted, tmp_path, monkeypatch):
    save = Checkpointer.save

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    def crash_on_second_save(self, step):
        if step == 2 * K:  # the training state is written, the exports fail
            self.trainer.export = disk_full
        return save(self, step)

    monkeypatch.setattr(Checkpointer, "save", crash_on_second_save)
    with pytest.raises(OSError, match="disk full"):
        train(config(latents, f"train.max_steps={2 * K}"), tmp_path)
    monkeypatch.undo()
    folder = tmp_path / "checkpoints"
    assert (folder / "latest").read_text() == f"step_{K:06d}"
    assert sorted(p.name for p in folder.iterdir()) == ["latest", f"step_{K:06d}", f"step_{2 * K:06d}.tmp"]

    train(config(latents, f"train.max_steps={2 * K}"), tmp_path, resume="latest")  # cleans the stale .tmp
    assert sorted(p.name for p in folder.iterdir()) == ["latest", f"step_{K:06d}", f"step_{2 * K:06d}"]
    assert_same_final_weights(tmp_path, uninterrupted)


def test_resume_lora_run_is_exact(latents, tmp_path):
    lora = ["lora.enabled=true", "lora.targets=[blocks.*.self_attn.*]", "lora.rank=2", "train.max_steps=%d",
            "checkpoint.keep_last=1"]
    full = [o.replace("%d", str(2 * K)) for o in lora]
    train(config(latents, *full), tmp_path / "full")
    train(config(latents, *[o.replace("%d", str(K)) for o in lora]), tmp_path / "split")
    train(config(latents, *full), tmp_path / "split", resume="latest")
    assert [p.name for p in (tmp_path / "split" / "checkpoints").glob("step_*")] == [f"step_{2 * K:06d}"]
    a, b = (read_state_dict(tmp_path / run / "checkpoints" / f"step_{2 * K:06d}" / "lora.safetensors")
            for run in ("full", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
