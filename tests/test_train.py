"""train.py end to end on CPU: a tiny DiT learns a synthetic set of moving-square videos, encoded
once by scripts/cache_latents.py with a tiny random VAE and umT5; the same run on 2 processes
(torchrun, gloo) follows the same loss curve; bad configs fail before any work."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import REPO_ROOT
from scripts.cache_latents import cache_latents
from trainers.config import ConfigError, load_config
from trainers.data import VideoDataset, sample_frame_indices
from trainers.loop import train
from wan.checkpoint import save_state_dict
from wan.lora import read_lora
from wan.model_loading import load_dit
from wan.modules.t5 import T5Encoder
from wan.modules.vae2_1 import WanVAE21
from wan.utils.tiny_tokenizer import make_tiny_tokenizer

TINY = REPO_ROOT / "configs" / "tests" / "tiny_t2v.yaml"
FRAMES, SIZE, VIDEOS = 9, 32, 8
COLORS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0), "white": (1.0, 1.0, 1.0)}
VAE_CONFIG = dict(dim=8, num_res_blocks=1)
T5_CONFIG = dict(vocab=64, dim=32, dim_attn=32, dim_ffn=64, num_heads=2, num_layers=1)

pytestmark = pytest.mark.usefixtures("single_thread")


def moving_square(index):
    """[FRAMES, SIZE, SIZE, 3] uint8: a coloured 8x8 square crossing a grey frame, and its caption."""
    name = list(COLORS)[index % len(COLORS)]
    direction = "right" if index % 2 else "left"
    video = np.full((FRAMES, SIZE, SIZE, 3), -0.6, np.float32)
    row = 4 + 3 * (index % 5)
    for f in range(FRAMES):
        col = 4 + 2 * f if direction == "right" else SIZE - 12 - 2 * f
        video[f, row:row + 8, col:col + 8] = COLORS[name]
    return ((video + 1) * 127.5).round().astype(np.uint8), f"a {name} square moving {direction}"


def write_videos(folder):
    import imageio.v2 as imageio

    folder.mkdir(parents=True)
    for i in range(VIDEOS):
        frames, caption = moving_square(i)
        imageio.mimwrite(folder / f"{i:03d}.mp4", frames, fps=8, macro_block_size=1)
        (folder / f"{i:03d}.txt").write_text(caption)
    (folder / f"{VIDEOS:03d}.mp4").write_bytes(b"not a video")  # corrupt: reported and skipped
    (folder / f"{VIDEOS:03d}.txt").write_text("a broken file")
    return folder


def write_encoders(folder):
    """A tiny random VAE and umT5 (+ tokenizer); returns the config overrides that use them."""
    torch.manual_seed(0)
    save_state_dict(WanVAE21(**VAE_CONFIG).state_dict(), folder / "vae.safetensors")
    save_state_dict(T5Encoder(**T5_CONFIG).state_dict(), folder / "t5.safetensors")
    make_tiny_tokenizer(folder / "tokenizer")
    return ([f"encoders.vae_checkpoint={folder / 'vae.safetensors'}",
             f"encoders.t5_checkpoint={folder / 't5.safetensors'}", f"encoders.t5_tokenizer={folder / 'tokenizer'}",
             "encoders.dtype=fp32", f"data.num_frames={FRAMES}", f"data.height={SIZE}", f"data.width={SIZE}"]
            + [f"encoders.vae_config.{k}={v}" for k, v in VAE_CONFIG.items()]
            + [f"encoders.t5_config.{k}={v}" for k, v in T5_CONFIG.items()])


def losses(logdir):
    """{step: loss} of a run's metrics.jsonl (a resumed step keeps its last record)."""
    return {r["step"]: r["loss"] for r in map(json.loads, open(Path(logdir) / "metrics.jsonl"))}


def run_train_cli(args, nproc=None, **popen):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] if nproc
                else [sys.executable])
    # one process runs with this process's thread count, so that their results agree bitwise
    threads = 1 if nproc else torch.get_num_threads()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    return subprocess.Popen(launcher + [str(REPO_ROOT / "train.py"), *map(str, args)], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)



@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    videos = write_videos(root / "videos")
    encoders = write_encoders(root)
    cfg = load_config(TINY, ["data.kind=videos", f"data.path={videos}", *encoders])
    written, skipped = cache_latents(cfg, root / "latents")
    return SimpleNamespace(root=root, videos=videos, latents=root / "latents", encoders=encoders, written=written,
                           skipped=skipped)


@pytest.fixture(scope="module")
def single_run(shapes, tmp_path_factory):
    logdir = tmp_path_factory.mktemp("single")
    history = train(load_config(TINY, [f"data.path={shapes.latents}"]), logdir)
    return SimpleNamespace(logdir=logdir, history=history)


def test_cache_latents_encodes_videos_and_skips_corrupt_ones(shapes):
    assert (shapes.written, shapes.skipped) == (VIDEOS, 1)
    files = sorted(shapes.latents.glob("*.safetensors"))
    assert len(files) == VIDEOS
    with safe_open(str(files[1]), "pt") as f:
        assert f.get_slice("latents").get_shape() == [16, 3, 4, 4]
        assert f.get_slice("context").get_shape() == [6, 32]  # "a green square moving right" + </s>
        assert f.metadata()["text"] == "a green square moving right"


def test_train_loss_falls_and_exports_load(single_run):
    loss = [r["loss"] for r in single_run.history]
    assert len(loss) == 30 and all(np.isfinite(loss))
    assert np.mean(loss[-5:]) < 0.7 * np.mean(loss[:5]), loss
    record = single_run.history[-1]
    assert {"lr", "grad_norm", "step_time", "tokens_per_s", "memory_gb"} <= set(record)
    final = single_run.logdir / "checkpoints" / "step_000030"
    assert (single_run.logdir / "checkpoints" / "latest").read_text() == final.name
    assert sorted(p.name for p in (single_run.logdir / "checkpoints").glob("step_*")) == [
        "step_000010", "step_000020", "step_000030"]
    model = load_dit(final / "model.safetensors")
    ema = load_dit(final / "model_ema.safetensors")
    assert model.dim == 64
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), ema.parameters()))


def test_train_two_processes_follow_the_same_loss_curve(shapes, single_run, tmp_path):
    steps = 12
    proc = run_train_cli(["--config_path", TINY, "--logdir", tmp_path, f"data.path={shapes.latents}",
                          f"train.max_steps={steps}"], nproc=2)
    output = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, output[-3000:]
    two = losses(tmp_path)
    one = {r["step"]: r["loss"] for r in single_run.history}
    assert sorted(two) == list(range(1, steps + 1))
    np.testing.assert_allclose([two[s] for s in two], [one[s] for s in two], rtol=1e-4)


def test_train_online_encoding_from_json(shapes, tmp_path):
    entries = [{"file_path": f"videos/{i:03d}.mp4", "text": moving_square(i)[1], "type": "video"} for i in range(4)]
    entries.append({"file_path": "videos/008.mp4", "text": "corrupt", "type": "video"})
    (shapes.root / "meta.json").write_text(json.dumps(entries))
    cfg = load_config(TINY, ["data.kind=json", f"data.path={shapes.root / 'meta.json'}", "train.max_steps=3",
                             "train.batch_size=1", "train.total_batch_size=2", *shapes.encoders])
    history = train(cfg, tmp_path)
    assert len(history) == 3 and all(np.isfinite(r["loss"]) for r in history)


def test_train_data_images_buckets_and_frame_sampling(shapes):
    from PIL import Image

    Image.fromarray(moving_square(0)[0][0]).resize((96, 32)).save(shapes.root / "wide.png")
    entries = [{"file_path": "wide.png", "text": "a red square", "type": "image"},
               {"file_path": "videos/001.mp4", "text": "a green square", "type": "video"}]
    (shapes.root / "mixed.json").write_text(json.dumps(entries))
    dataset = VideoDataset.from_json(shapes.root / "mixed.json", num_frames=5, frame_stride=2, height=32, width=32,
                                     buckets=[(32, 32), (16, 48)])
    assert dataset.buckets == [(1, 16, 48), (5, 32, 32)]  # nearest aspect ratio; images are 1 frame
    image, video = dataset[(0, 0)], dataset[(1, 0)]
    assert image["video"].shape == (3, 1, 16, 48) and video["video"].shape == (3, 5, 32, 32)
    assert -1 <= float(video["video"].min()) and float(video["video"].max()) <= 1
    assert sample_frame_indices(9, 5, 2, random.Random(0)) == [0, 2, 4, 6, 8]
    short = sample_frame_indices(6, 5, 3, random.Random(0))
    assert len(short) == 5 and set(np.diff(short)) == {1} and short[-1] < 6  # stride lowered to fit


def test_train_lora_with_frozen_bf16_base(shapes, single_run, tmp_path):
    base = single_run.logdir / "checkpoints" / "step_000030" / "model.safetensors"
    cfg = load_config(TINY, [f"data.path={shapes.latents}", f"model.checkpoint={base}", "lora.enabled=true",
                             "lora.targets=[blocks.*.self_attn.q,blocks.*.cross_attn.v]", "lora.rank=4",
                             "lora.dropout=0.1", "train.mixed_precision=bf16", "train.max_steps=4",
                             "checkpoint.every=4"])
    history = train(cfg, tmp_path)
    assert all(np.isfinite(r["loss"]) for r in history)
    final = tmp_path / "checkpoints" / "step_000004"
    assert not (final / "model.safetensors").exists()
    lora = read_lora(final / "lora.safetensors")
    assert sorted(lora) == ["blocks.0.cross_attn.v", "blocks.0.self_attn.q", "blocks.1.cross_attn.v",
                            "blocks.1.self_attn.q"]
    assert all(b.abs().max() > 0 for _, b, _ in lora.values())  # lora_B moved off its zero init
    assert set(read_lora(final / "lora_ema.safetensors")) == set(lora)


BAD_CONFIGS = [
    (["trainer=distill_magic"], "unknown trainer 'distill_magic'; registered trainers: diffusion"),
    (["data.path=/no/such/folder"], "data.path not found: /no/such/folder"),
    (["train.total_batch_size=6", "train.batch_size=4"], "train.total_batch_size 6 is not divisible by "
                                                         "train.batch_size 4 x 1 process(es) = 4"),
    (["lora.enabled=true", "lora.targets=[blocks.*.self_attn.qq]"], "['blocks.*.self_attn.qq'] match no nn.Linear"),
    (["optimizer.lrr=1"], "unknown config key"),
]


@pytest.mark.parametrize("overrides,message", BAD_CONFIGS, ids=["trainer", "data", "batch", "lora", "key"])
def test_train_bad_config_is_one_clear_error(shapes, overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(TINY, [f"data.path={shapes.latents}", *overrides])
    assert message in str(error.value)
    assert str(error.value).count("\n  - ") <= 1  # exactly the one problem


def test_train_cli_rejects_bad_config_before_any_work(tmp_path):
    logdir = tmp_path / "run"
    proc = run_train_cli(["--config_path", TINY, "--logdir", logdir, "trainer=nope", "data.path=/missing"])
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0
    assert "unknown trainer 'nope'" in output and "data.path not found: /missing" in output
    assert "Traceback" not in output and not logdir.exists()


def test_train_toml_config_equals_yaml(tmp_path):
    toml = tmp_path / "tiny.toml"
    toml.write_text('trainer = "diffusion"\n\n[model]\npreset = "t2v-1.3B"\n'
                    'config = { dim = 64, ffn_dim = 128, num_heads = 2, num_layers = 2, text_dim = 32, freq_dim = 32, '
                    'text_len = 16 }\n\n[data]\nkind = "latents"\nnum_workers = 0\n\n[diffusion]\nshift = 3.0\n\n'
                    '[optimizer]\nlr = 2.0e-3\nweight_decay = 0.0\n\n[train]\nmax_steps = 30\ntotal_batch_size = 4\n'
                    'batch_size = 2\nmixed_precision = "fp32"\nema_weight = 0.9\n\n'
                    '[checkpoint]\nevery = 10\nexport_dtype = "fp32"\n')
    overrides = [f"data.path={tmp_path}"]
    assert load_config(toml, overrides) == load_config(TINY, overrides)


@pytest.mark.parametrize("name", ["t2v_1.3B_finetune.yaml", "t2v_1.3B_lora.yaml", "i2v_14B_lora.toml"])
def test_train_shipped_configs_validate(name, tmp_path):
    cfg = load_config(REPO_ROOT / "configs" / name, [f"data.path={tmp_path}", "model.checkpoint=null"], world_size=8)
    assert cfg.trainer == "diffusion"


@pytest.mark.parametrize("teacher_forcing", [False, True])
def test_train_causal_diffusion_forcing(shapes, tmp_path, teacher_forcing):
    cfg = load_config(TINY, [f"data.path={shapes.latents}", "causal.enabled=true", "causal.num_frame_per_block=1",
                             f"causal.teacher_forcing={teacher_forcing}", "train.max_steps=2", "checkpoint.every=2"])
    history = train(cfg, tmp_path)
    assert all(np.isfinite(r["loss"]) for r in history)
    model = load_dit(tmp_path / "checkpoints" / "step_000002" / "model.safetensors")  # official names
    assert len(model.blocks) == 2


def test_train_teacher_forcing_attends_to_earlier_clean_blocks_only():
    from conftest import randomize, tiny_dit_config
    from trainers.diffusion import TeacherForcedCausalWan
    from wan.modules.model import WanModel

    model = TeacherForcedCausalWan(randomize(WanModel(**tiny_dit_config())), num_frame_per_block=1).eval()
    g = torch.Generator().manual_seed(0)
    x, clean = torch.randn(2, 1, 16, 3, 4, 4, generator=g)
    t, context = torch.tensor([[900.0, 500.0, 100.0]]), torch.randn(1, 4, 32, generator=g)
    with torch.no_grad():
        out = model(x, t, context, clean=clean)
        later = clean.clone()
        later[:, :, 2] += 1  # the last block's clean frame is seen by no noisy block
        torch.testing.assert_close(model(x, t, context, clean=later), out, atol=1e-6, rtol=0)
        first = clean.clone()
        first[:, :, 0] += 1  # seen by noisy blocks 1 and 2, not by block 0
        changed = (model(x, t, context, clean=first) - out).abs().amax(dim=(0, 1, 3, 4))
        assert changed[0] < 1e-6 and (changed[1:] > 1e-4).all()
