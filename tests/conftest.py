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
