"""Converts whole checkpoint folders between the official Wan layout and the diffusers layout.

Tensors are renamed through the declarative key tables in `wan.convert` and `wan.convert_vae`;
configs are translated by the matching `config_*` functions. The tokenizer folder is copied.
"""

import inspect
import json
import shutil
from pathlib import Path

import torch

from wan.checkpoint import read_state_dict, save_sharded, save_state_dict
from wan.convert.dit_diffusers import config_from_diffusers, config_to_diffusers, dit_from_diffusers, dit_to_diffusers
from wan.convert.encoders_hf import (clip_config_from_hf, clip_config_to_hf, clip_from_hf, clip_to_hf,
                                     t5_config_from_hf, t5_config_to_hf, t5_from_hf, t5_to_hf)
from wan.convert_vae import config_from_diffusers as vae_config_from_diffusers
from wan.convert_vae import diffusers_config as vae_config_to_diffusers
from wan.convert_vae import vae_from_diffusers, vae_to_diffusers
from wan.model_loading import read_dit_config
from wan.modules.clip import VisionTransformer, visual_state_dict
from wan.modules.t5 import T5Encoder

from .loading import WAN_CONFIG, dit_folders, dit_weights, resolve_preset

SHARD_BYTES = 5 * 2**30
DIFFUSERS_VERSION = "0.35.0"


def _defaults(cls):
    return {n: p.default for n, p in inspect.signature(cls).parameters.items()}


def _write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=list))


def _save_weights(state, folder, name):
    """One safetensors file, or shards with an index past 5 GB, as the releases do."""
    if sum(v.numel() * v.element_size() for v in state.values()) > SHARD_BYTES:
        save_sharded(state, folder, prefix=Path(name).stem, max_shard_bytes=SHARD_BYTES)
    else:
        save_state_dict(state, Path(folder) / name)


def official_to_diffusers(src, dst, task):
    src, dst = Path(src), Path(dst)
    preset, extra = resolve_preset(task, src)
    names = ["transformer", "transformer_2"] if preset.is_moe else ["transformer"]
    for name, folder in zip(names, dit_folders(src, preset.is_moe)):
        config = read_dit_config(folder) or dict(preset.dit)
        _save_weights(dit_to_diffusers(read_state_dict(dit_weights(folder))), dst / name,
                      "diffusion_pytorch_model.safetensors")
        _write_json(dst / name / "config.json", {"_class_name": "WanTransformer3DModel",
                                                 "_diffusers_version": DIFFUSERS_VERSION, **config_to_diffusers(config)})

    version = preset.vae.removeprefix("wan")
    _save_weights(vae_to_diffusers(read_state_dict(src / preset.vae_checkpoint)), dst / "vae",
                  "diffusion_pytorch_model.safetensors")
    _write_json(dst / "vae" / "config.json", {"_class_name": "AutoencoderKLWan", "_diffusers_version": DIFFUSERS_VERSION,
                                              **vae_config_to_diffusers(version, **extra.get("vae", {}))})

    from transformers import CLIPVisionConfig, UMT5Config

    t5_config = {**_defaults(T5Encoder), **extra.get("t5", {})}
    _save_weights(t5_to_hf(read_state_dict(src / preset.files["t5_checkpoint"])), dst / "text_encoder",
                  "model.safetensors")
    _write_json(dst / "text_encoder" / "config.json",
                {**UMT5Config(**t5_config_to_hf(t5_config)).to_dict(), "architectures": ["UMT5EncoderModel"]})
    shutil.copytree(src / preset.files["t5_tokenizer"], dst / "tokenizer", dirs_exist_ok=True)

    index = {"_class_name": "WanImageToVideoPipeline" if preset.task in ("i2v", "flf2v") else "WanPipeline",
             "_diffusers_version": DIFFUSERS_VERSION,
             "transformer": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"],
             "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
             "scheduler": ["diffusers", "UniPCMultistepScheduler"]}
    if preset.is_moe:
        index.update(transformer_2=["diffusers", "WanTransformer3DModel"], boundary_ratio=preset.moe_boundary)
    if preset.task == "ti2v":
        index["expand_timesteps"] = True
    if preset.use_clip:
        clip_config = {**_defaults(VisionTransformer), **extra.get("clip", {})}
        _save_weights(clip_to_hf(visual_state_dict(read_state_dict(src / preset.files["clip_checkpoint"]))),
                      dst / "image_encoder", "model.safetensors")
        _write_json(dst / "image_encoder" / "config.json",
                    {**CLIPVisionConfig(**clip_config_to_hf(clip_config)).to_dict(),
                     "architectures": ["CLIPVisionModelWithProjection"]})
        index.update(image_encoder=["transformers", "CLIPVisionModelWithProjection"],
                     image_processor=["transformers", "CLIPImageProcessor"])
    _write_json(dst / "model_index.json", index)
    _write_json(dst / WAN_CONFIG, {k: v for k, v in extra.items() if k in ("preset", "overrides")})
    return dst


def diffusers_to_official(src, dst, task):
    src, dst = Path(src), Path(dst)
    preset, extra = resolve_preset(task, src)
    extra = {k: v for k, v in extra.items() if k in ("preset", "overrides")}
    targets = [dst / preset.files["high_noise_checkpoint"], dst / preset.files["low_noise_checkpoint"]] \
        if preset.is_moe else [dst]
    for folder, target in zip(dit_folders(src, preset.is_moe), targets):
        config = config_from_diffusers(json.loads((folder / "config.json").read_text()))
        _save_weights(dit_from_diffusers(read_state_dict(dit_weights(folder))), target,
                      "diffusion_pytorch_model.safetensors")
        _write_json(target / "config.json", {"_class_name": "WanModel", **config})

    version, extra["vae"] = vae_config_from_diffusers(json.loads((src / "vae" / "config.json").read_text()))
    torch.save(vae_from_diffusers(read_state_dict(src / "vae")), dst / f"Wan{version}_VAE.pth")

    extra["t5"] = t5_config_from_hf(json.loads((src / "text_encoder" / "config.json").read_text()))
    torch.save(t5_from_hf(read_state_dict(src / "text_encoder")), dst / preset.files["t5_checkpoint"])
    shutil.copytree(src / "tokenizer", dst / preset.files["t5_tokenizer"], dirs_exist_ok=True)

    if (src / "image_encoder").exists():
        state = clip_from_hf(read_state_dict(src / "image_encoder"))
        extra["clip"] = clip_config_from_hf(json.loads((src / "image_encoder" / "config.json").read_text()),
                                            has_projection="head" in state)
        torch.save({f"visual.{k}": v for k, v in state.items()}, dst / preset.files["clip_checkpoint"])
    _write_json(dst / WAN_CONFIG, extra)
    return dst
