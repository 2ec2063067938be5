"""Checkpoint I/O: read official / diffusers / Self-Forcing weight files and load them strictly.

A model is built on the meta device and filled with `load_state_dict(..., assign=True)`, so the
weights of a 14B model are never held twice in memory.
"""

import json
import logging
import os
import zipfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
# Training checkpoints (Self-Forcing, CausVid, ours) nest the weights under one of these keys.
NESTED_STATE_KEYS = ("generator_ema", "generator", "model_ema", "ema", "state_dict", "model")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not match the model."""


def _read_single(path, device="cpu"):
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path), device=str(device))
    return load_torch_file(path, device)


def load_torch_file(path, device="cpu"):
    """A `torch.save` file, memory-mapped when it is in the zip format."""
    # Files written by torch < 1.6 (`_use_new_zipfile_serialization=False`) cannot be memory-mapped.
    return torch.load(str(path), map_location=device, weights_only=True, mmap=zipfile.is_zipfile(path))


def _index_files(index_path):
    with open(index_path) as f:
        weight_map = json.load(f)["weight_map"]
    return sorted(set(weight_map.values())), weight_map


def resolve_weight_files(path):
    """Returns the list of weight files that make up the checkpoint at `path`.

    `path` is a weight file, a `*.index.json` of a sharded checkpoint, or a folder holding either.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path} (expected a weight file "
                              f"{'/'.join(WEIGHT_SUFFIXES)}, a *.index.json or a folder holding them)")
    if path.is_file() and path.name.endswith(".index.json"):
        shards, _ = _index_files(path)
        missing = [s for s in shards if not (path.parent / s).exists()]
        if missing:
            raise CheckpointError(f"sharded checkpoint {path} lists {len(missing)} missing shard(s): "
                                  f"{missing[:4]}; download every file named in the index")
        return [path.parent / s for s in shards]
    if path.is_file():
        return [path]
    indices = sorted(path.glob("*.index.json"))
    if len(indices) == 1:
        return resolve_weight_files(indices[0])
    weights = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if len(weights) == 1:
        return weights
    raise CheckpointError(f"cannot tell which weights to load in folder {path}: found "
                          f"{len(indices)} index file(s) and {len(weights)} weight file(s) "
                          f"({[p.name for p in weights][:6]}); pass the file itself")


def unwrap_state_dict(obj, nested_key=None):
    """Returns the flat tensor dict of a checkpoint that may nest it (`generator_ema`, `model.` prefix)."""
    if nested_key is not None:
        if nested_key not in obj:
            raise CheckpointError(f"checkpoint has no entry '{nested_key}'; it has {sorted(obj)[:8]}")
        obj = obj[nested_key]
    elif not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in NESTED_STATE_KEYS:
            if isinstance(obj.get(key), dict):
                log.info("using the '%s' entry of a nested checkpoint", key)
                obj = obj[key]
                break
    if obj and all(k.startswith("model.") for k in obj):
        obj = {k[len("model."):]: v for k, v in obj.items()}
    return obj


def read_state_dict(path, device="cpu", nested_key=None):
    """Reads all tensors of a checkpoint (single file, sharded with index, or folder) into one dict."""
    state = {}
    for file in resolve_weight_files(path):
        log.info("reading weights from %s", file)
        state.update(_read_single(file, device))
    return unwrap_state_dict(state, nested_key)


def read_checkpoint_keys(path):
    """Returns the tensor names of a checkpoint without reading the tensors (safetensors only)."""
    keys = []
    for file in resolve_weight_files(path):
        if file.suffix != ".safetensors":
            return list(read_state_dict(path))
        with safe_open(str(file), "pt") as f:
            keys.extend(f.keys())
    return keys


def _preview(keys, limit=8):
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_state_dict(model, state_dict, source="checkpoint"):
    """Raises a `CheckpointError` naming missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = expected.keys() - state_dict.keys()
    unexpected = state_dict.keys() - expected.keys()
    wrong_shape = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
                   for k in expected.keys() & state_dict.keys()
                   if tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong_shape:
        lines = [f"{source} does not match {type(model).__name__}:"]
        if missing:
            lines.append(f"  {len(missing)} missing key(s): {_preview(missing)}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected key(s): {_preview(unexpected)}")
        if wrong_shape:
            lines.append(f"  {len(wrong_shape)} shape mismatch(es): {_preview(wrong_shape, 4)}")
        lines.append("  check that the model config matches the checkpoint, or convert its key layout "
                     "(scripts/convert_checkpoint.py)")
        raise CheckpointError("\n".join(lines))


def load_state_dict(model, state_dict, dtype=None, source="checkpoint"):
    """Loads `state_dict` strictly into `model` (which may live on the meta device).

    Tensors are assigned, not copied, so a meta-device model takes the checkpoint's storage.
    Floating tensors are cast to `dtype` when given, else to the model's own dtype.
    """
    check_state_dict(model, state_dict, source)
    expected = model.state_dict()
    cast = {}
    for key, value in state_dict.items():
        target = dtype if dtype is not None else expected[key].dtype
        cast[key] = value.to(target) if value.is_floating_point() and target.is_floating_point else value
    model.load_state_dict(cast, strict=True, assign=True)
    return model


def load_model(build, path, dtype=None, device="cpu", nested_key=None, convert=None):
    """Builds a model with `build()` on the meta device and fills it from the checkpoint at `path`.

    `convert` maps the checkpoint's key layout onto ours (e.g. a diffusers key table).
    """
    with torch.device("meta"):
        model = build()
    state = read_state_dict(path, device=device, nested_key=nested_key)
    if convert is not None:
        state = convert(state)
    load_state_dict(model, state, dtype=dtype, source=str(path))
    log.info("loaded %s (%.2fB parameters) from %s", type(model).__name__,
             sum(p.numel() for p in model.parameters()) / 1e9, path)
    return model.to(device)


def save_state_dict(state_dict, path, metadata=None):
    """Writes a safetensors file atomically: a crash mid-write never leaves a truncated file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def save_sharded(state_dict, folder, prefix="diffusion_pytorch_model", max_shard_bytes=5 * 2**30):
    """Writes safetensors shards plus `<prefix>.safetensors.index.json`, as the official 14B releases."""
    folder = Path(folder)
    shards, current, size = [], {}, 0
    for key, value in state_dict.items():
        nbytes = value.numel() * value.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = value
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_state_dict(shard, folder / name)
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in state_dict.values())
    index = folder / f"{prefix}.safetensors.index.json"
    with open(index, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return index
