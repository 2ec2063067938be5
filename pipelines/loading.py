"""Whole Wan checkpoint folders, official release layout or diffusers layout, as one set of modules.

Official layout (file names in `wan.configs.preset.OFFICIAL_FILES`): `config.json` + DiT weights at
the top (A14B: in `high_noise_model/` and `low_noise_model/`), `Wan2.x_VAE.pth`, the umT5 `.pth`
with its tokenizer folder, and for Wan2.1 I2V/FLF2V the CLIP `.pth`.
Diffusers layout: `model_index.json` with `transformer/` (+ `transformer_2/`, the low-noise expert),
`vae/`, `text_encoder/`, `tokenizer/`, `image_encoder/`.
A folder may also hold `wan_config.json` (written by `scripts/make_tiny_checkpoint.py`): the preset it
follows, overrides of the preset's defaults (sizes, steps, ...) and the encoder and VAE configs.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from wan.checkpoint import CheckpointError, load_torch_file, read_checkpoint_keys
from wan.configs import get_preset
from wan.convert.encoders_hf import clip_config_from_hf, t5_config_from_hf
from wan.convert_vae import config_from_diffusers as vae_config_from_diffusers
from wan.convert_vae import load_vae
from wan.model_loading import load_dit, read_dit_config
from wan.modules.clip import CLIPImageEncoder
from wan.modules.moe import WanMoE
from wan.modules.text_encoder import T5TextEncoder

log = logging.getLogger(__name__)

# Inference task -> the presets it can be (chosen by the DiT width in the folder's config.json).
TASK_PRESETS = {
    "t2v": ("t2v-1.3B", "t2v-14B"),
    "i2v": ("i2v-14B",),
    "flf2v": ("flf2v-14B",),
    "ti2v": ("ti2v-5B",),
    "t2v-A14B": ("t2v-A14B",),
    "i2v-A14B": ("i2v-A14B",),
}
WAN_CONFIG = "wan_config.json"


@dataclass
class WanComponents:
    preset: object          # the WanPreset, with this folder's overrides applied
    dit: torch.nn.Module    # WanModel, or WanMoE for A14B
    vae: torch.nn.Module
    text_encoder: T5TextEncoder
    clip: CLIPImageEncoder = None
    folder: Path = None


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def default_dtype(device):
    """The weights dtype when none is asked for: fp32 on the CPU, bf16 on an accelerator."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def requested_dtype(name, device):
    """The torch dtype a `--dtype` option names (e.g. "bfloat16"), or `default_dtype(device)` when None."""
    return getattr(torch, name) if name else default_dtype(device)


def read_wan_config(folder):
    """A folder's `wan_config.json` (tiny folders: preset, overrides, encoder and VAE configs), or {}."""
    path = Path(folder) / WAN_CONFIG
    return _read_json(path) if path.exists() else {}


def with_family_defaults(preset, folder, defaults, fields):
    """`preset` with an extension family's `defaults` for `fields` (and its default `size`, if any, first
    among the sizes), except what the folder's `wan_config.json` overrides fix (tiny folders)."""
    fixed = read_wan_config(folder).get("overrides", {})
    changes = {k: defaults[k] for k in fields if k not in fixed}
    if "size" in defaults and "sizes" not in fixed:
        changes["sizes"] = (defaults["size"], *(s for s in preset.sizes if s != defaults["size"]))
    return preset.with_overrides(**changes)


def is_diffusers_folder(folder):
    return (Path(folder) / "model_index.json").exists()


def _require(path, what):
    if not Path(path).exists():
        raise CheckpointError(f"missing {what}: expected {path}")
    return Path(path)


def resolve_preset(task, folder):
    """The preset of `task` that this folder holds, with its `wan_config.json` overrides applied."""
    if task not in TASK_PRESETS:
        raise ValueError(f"unknown task '{task}'; choose one of {', '.join(TASK_PRESETS)}")
    folder = Path(folder)
    extra = read_wan_config(folder)
    candidates = TASK_PRESETS[task]
    if extra.get("preset"):
        if extra["preset"] not in candidates:
            raise ValueError(f"{folder} holds a '{extra['preset']}' model, which task '{task}' cannot run; "
                             f"use --task {next(t for t, p in TASK_PRESETS.items() if extra['preset'] in p)}")
        preset = get_preset(extra["preset"])
    else:
        dit_folder = dit_folders(folder, get_preset(candidates[0]).is_moe)[0]
        config = read_dit_config(dit_folder) or {}
        preset = next((get_preset(n) for n in candidates if get_preset(n).dit["dim"] == config.get("dim")),
                      get_preset(candidates[0]))
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in extra.get("overrides", {}).items()}
    return preset.with_overrides(**overrides), extra


def dit_folders(folder, moe):
    """The DiT folders of a checkpoint folder of either layout: [high-noise, low-noise] expert folders for
    MoE, else [the DiT folder]; a missing one is a CheckpointError."""
    folder = Path(folder)
    if is_diffusers_folder(folder):
        names = ["transformer", "transformer_2"] if moe else ["transformer"]
    else:
        names = ["high_noise_model", "low_noise_model"] if moe else ["."]
    return [_require(folder / n, "DiT folder") for n in names]


DIT_WEIGHTS = ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors")


def dit_weights(folder):
    """The DiT weights in a folder that may also hold the VAE and encoders (official layout)."""
    for name in DIT_WEIGHTS:
        if (Path(folder) / name).exists():
            return Path(folder) / name
    raise CheckpointError(f"no DiT weights in {folder}: expected {' or '.join(DIT_WEIGHTS)} (or shards with an index)")


def _load_dit(folder, preset, dtype, device, offload):
    target = "cpu" if offload else device
    models = [load_dit(dit_weights(f), config={"text_len": preset.text_len, **(read_dit_config(f) or preset.dit)},
                       dtype=dtype, device=target).eval().requires_grad_(False)
              for f in dit_folders(folder, preset.is_moe)]
    if not preset.is_moe:
        return models[0]
    return WanMoE(models[0], models[1], boundary=preset.moe_boundary,
                  num_train_timesteps=preset.num_train_timesteps, offload=offload, device=device)


def load_folder_vae(folder, preset, extra, device):
    """The VAE (fp32) of a checkpoint folder of either layout; `extra` is the folder's `wan_config.json`."""
    folder = Path(folder)
    if is_diffusers_folder(folder):
        version, config = vae_config_from_diffusers(_read_json(_require(folder / "vae" / "config.json", "VAE config")))
        return load_vae(folder / "vae", version, torch.float32, device, **config)
    path = _require(folder / preset.vae_checkpoint, "VAE checkpoint")
    return load_vae(path, preset.vae.removeprefix("wan"), torch.float32, device, **extra.get("vae", {}))


def load_folder_text_encoder(folder, preset, extra, device, t5_cpu=False):
    """The umT5 encoder with its tokenizer (fp32 on CPU, bf16 on GPU) of a checkpoint folder of either
    layout, returning its embeddings on `device`; `t5_cpu` keeps the model itself on the CPU."""
    folder = Path(folder)
    model_device = "cpu" if t5_cpu else device
    if is_diffusers_folder(folder):
        config = t5_config_from_hf(_read_json(_require(folder / "text_encoder" / "config.json", "text encoder config")))
        weights, tokenizer = folder / "text_encoder", _require(folder / "tokenizer", "tokenizer folder")
    else:
        config = extra.get("t5", {})
        weights = _require(folder / preset.files["t5_checkpoint"], "umT5 checkpoint")
        tokenizer = _require(folder / preset.files["t5_tokenizer"], "umT5 tokenizer folder")
    return T5TextEncoder.from_checkpoint(weights, tokenizer, text_len=preset.text_len,
                                         dtype=default_dtype(model_device), device=model_device,
                                         output_device=device, **config)


def load_folder_clip(folder, preset, extra, device):
    """The CLIP image encoder (Wan2.1 I2V/FLF2V) of a checkpoint folder of either layout."""
    folder = Path(folder)
    if is_diffusers_folder(folder):
        weights = _require(folder / "image_encoder", "image encoder folder")
        has_projection = any(k.startswith("visual_projection") for k in read_checkpoint_keys(weights))
        config = clip_config_from_hf(_read_json(weights / "config.json"), has_projection)
    else:
        weights = _require(folder / preset.files["clip_checkpoint"], "CLIP checkpoint")
        config = extra.get("clip", {})
    return CLIPImageEncoder.from_checkpoint(weights, device=device, **config)


def required_files(folder, preset):
    """Paths a folder must hold for `preset`, so a missing file is reported before any loading."""
    folder = Path(folder)
    if is_diffusers_folder(folder):
        names = ["transformer", "transformer_2"] if preset.is_moe else ["transformer"]
        names += ["vae", "text_encoder", "tokenizer"] + (["image_encoder"] if preset.use_clip else [])
        return [folder / n for n in names]
    files = [folder / preset.vae_checkpoint, folder / preset.files["t5_checkpoint"],
             folder / preset.files["t5_tokenizer"]]
    if preset.use_clip:
        files.append(folder / preset.files["clip_checkpoint"])
    return [*dit_folders(folder, preset.is_moe), *files]


def check_folder(checkpoint_dir, task):
    """Resolves the preset and checks that every file is there; returns the preset (no weights read)."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    preset, _ = resolve_preset(task, folder)
    files = required_files(folder, preset)
    for dit_folder in dit_folders(folder, preset.is_moe):
        dit_weights(dit_folder)
    require_files(folder, files, preset.name)
    return preset


def require_files(folder, paths, family, hint=""):
    """Raises a CheckpointError listing every one of `paths` that does not exist: `folder` is not a
    complete `family` checkpoint (`hint`, e.g. where the layout is described, ends the message)."""
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise CheckpointError(f"{folder} is not a complete {family} checkpoint; missing: {', '.join(missing)}{hint}")


def check_variant_folder(folder, family, contents, config_what, preset_of):
    """Checks an official-layout folder of a DiT variant (VACE, Animate) before any loading: not the
    diffusers layout, the DiT's `config.json` there (`config_what` names what it must hold), then every
    file of the preset `preset_of(folder) -> (preset, extra)` and the DiT weights. `contents` lists
    what the folder holds, for the diffusers-layout error."""
    if is_diffusers_folder(folder):
        raise CheckpointError(f"{folder} is in the diffusers layout; {family} reads the official folder ({contents})")
    if read_dit_config(folder) is None:
        raise CheckpointError(f"missing {Path(folder) / 'config.json'} ({config_what})")
    preset, _ = preset_of(folder)
    require_files(folder, required_files(folder, preset), family)
    dit_weights(folder)


def trained_dit_weights(path, use_ema):
    """(weights, nested key) of a trained DiT: a training export folder (`model[_ema].safetensors`), a
    weight file, or a Self-Forcing/CausVid dict (`generator[_ema]`)."""
    path = Path(path)
    if path.is_dir():
        return _require(path / ("model_ema.safetensors" if use_ema else "model.safetensors"),
                        "EMA weights (drop --use_ema for the raw weights)" if use_ema else "trained weights"), None
    _require(path, "DiT checkpoint")
    if path.suffix in (".pt", ".pth", ".ckpt"):
        keys = load_torch_file(path, "meta").keys()
        if "generator" in keys or "generator_ema" in keys:
            return path, "generator_ema" if use_ema else "generator"
    return path, None


def replace_dit_weights(components, path, use_ema=False, dtype=None):
    """Loads fine-tuned or distilled DiT weights over the folder's own (same architecture)."""
    if components.preset.is_moe:
        raise ValueError("--dit_checkpoint takes one DiT; for A14B put the trained experts in the checkpoint "
                         "folder's high_noise_model/ and low_noise_model/")
    weights, nested_key = trained_dit_weights(path, use_ema)
    old = components.dit
    config = read_dit_config(weights.parent) or read_dit_config(dit_folders(components.folder, False)[0])
    components.dit = load_dit(weights, config=config, dtype=dtype or old.dtype, device=old.device,
                              nested_key=nested_key).eval().requires_grad_(False)
    return components


def load_components(checkpoint_dir, task, dtype=None, device="cpu", t5_cpu=False, offload_model=False):
    """Loads every module a task needs from a checkpoint folder.

    dtype: DiT parameter dtype (default bf16 on GPU, fp32 on CPU).
    t5_cpu: keep the text encoder on the CPU (saves ~11 GB of GPU memory for umT5-XXL).
    offload_model: keep the DiT (A14B: the idle expert) on the CPU between uses.
    """
    folder = Path(checkpoint_dir)
    check_folder(folder, task)
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    preset, extra = resolve_preset(task, folder)
    log.info("loading %s (%s) from %s", preset.name, "diffusers layout" if is_diffusers_folder(folder)
             else "official layout", folder)
    text_encoder = load_folder_text_encoder(folder, preset, extra, device, t5_cpu)
    clip = load_folder_clip(folder, preset, extra, device) if preset.use_clip else None
    vae = load_folder_vae(folder, preset, extra, device)
    dit = _load_dit(folder, preset, dtype, device, offload_model)
    return WanComponents(preset, dit, vae, text_encoder, clip, folder)
