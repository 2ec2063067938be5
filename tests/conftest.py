import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

torch.set_num_threads(2)

TINY_DIT = dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, freq_dim=32, text_len=16)


def tiny_dit_config(model_type="t2v", **overrides):
    in_dim = {"t2v": 16, "i2v": 36, "flf2v": 36, "ti2v": 48}[model_type]
    out_dim = 48 if model_type == "ti2v" else 16
    return dict(TINY_DIT, model_type=model_type, in_dim=in_dim, out_dim=out_dim, **overrides)


def state_shapes(state):
    """{key: shape as a list} of a state dict, as the reference manifests list them."""
    return {k: list(v.shape) for k, v in state.items()}


def randomize(model, std=0.05, seed=0):
    """Random weights everywhere (the default init zeroes some layers, hiding wiring mistakes)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std)
    return model


@pytest.fixture(scope="module")
def single_thread():
    """One thread: tiny tensors run fastest so, as each torchrun process of the multi-process tests
    does, and they do not suffer when other work holds the cores. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_config():
    return tiny_dit_config


@pytest.fixture(scope="module")
def tiny_t2v(tmp_path_factory):
    """A tiny random-weight t2v checkpoint folder (official layout)."""
    from pipelines.tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint("t2v", tmp_path_factory.mktemp("ckpt") / "t2v")


def mp4_frames(path):
    """The frames of a written video, uint8 [H, W, 3] each (`list(reader)` would ask its length, which
    imageio reports as inf)."""
    import imageio

    with imageio.get_reader(str(path), "ffmpeg") as reader:
        return [frame for frame in reader]


def mp4_fps(path):
    """The frame rate in a written video's header."""
    import imageio

    with imageio.get_reader(str(path), "ffmpeg") as reader:
        return reader.get_meta_data()["fps"]


def run_inference_main(*args):
    """`inference.main` in this process on `args` (paths and numbers are str()-ed); returns its exit code."""
    import inference

    return inference.main([str(a) for a in args])
