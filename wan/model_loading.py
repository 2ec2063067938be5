"""Loading a Wan DiT from an official, diffusers or Self-Forcing checkpoint."""

import json
import logging
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_state_dict, read_state_dict, save_state_dict
from .convert.dit_diffusers import config_from_diffusers, dit_from_diffusers, is_diffusers_dit
from .modules.model import WanModel

log = logging.getLogger(__name__)


def read_dit_config(folder):
    """WanModel arguments from the `config.json` of a DiT folder (official or diffusers layout)."""
    path = Path(folder) / "config.json"
    if not path.exists():
        return None
    with open(path) as f:
        config = json.load(f)
    if "num_attention_heads" in config:
        return config_from_diffusers(config)
    return config


def save_dit(folder, state_dict, config, class_name, file_name="diffusion_pytorch_model.safetensors"):
    """A DiT folder in the official layout: the weights as `file_name` and `config.json` (the model's
    arguments under the release's `_class_name`, as `read_dit_config` reads them back)."""
    folder = Path(folder)
    save_state_dict(state_dict, folder / file_name)
    (folder / "config.json").write_text(json.dumps({"_class_name": class_name, **config}, indent=2))


def load_dit(path, config=None, dtype=None, device="cpu", nested_key=None):
    """Builds a WanModel on the meta device and fills it from `path`.

    path: a DiT folder (`config.json` + weights), a weight file, or a `*.index.json`.
    config: WanModel arguments; by default read from `config.json` beside the weights.
    Keys in the diffusers layout are converted; nested training checkpoints (Self-Forcing's
    `generator_ema`, `model.` prefixes) are unwrapped. Whether the CLIP image branch exists is
    read off the checkpoint (Wan2.1 i2v has it, Wan2.2 A14B i2v does not).
    """
    path = Path(path)
    if config is None:
        config = read_dit_config(path if path.is_dir() else path.parent)
    if config is None:
        raise CheckpointError(f"no config.json beside {path}; pass the model config (or a preset's `dit`)")
    state = read_state_dict(path, device="cpu", nested_key=nested_key)
    if is_diffusers_dit(state):
        log.info("converting diffusers-layout DiT keys from %s", path)
        state = dit_from_diffusers(state)
    config = dict(config)
    config.setdefault("image_branch", any(k.startswith("img_emb.") for k in state))
    with torch.device("meta"):
        model = WanModel.from_config(config)
    load_state_dict(model, state, dtype=dtype, source=str(path))
    log.info("loaded %s DiT (%.2fB parameters) from %s", model.model_type,
             sum(p.numel() for p in model.parameters()) / 1e9, path)
    return model.to(device)
