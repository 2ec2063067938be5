"""Tiny random-weight checkpoint folders in the official layout, for CPU runs and tests.

Every component is real (same classes, same file names, same loaders as the released models);
only the widths are tiny, and `wan_config.json` declares the small sizes, frame count and step
count the folder supports, so the whole pipeline runs on a CPU in seconds.
"""

import json
from pathlib import Path

import torch

from wan.configs import get_preset
from wan.convert_vae import VAE_CLASSES
from wan.model_loading import save_dit
from wan.modules.clip import VisionTransformer
from wan.modules.model import WanModel
from wan.modules.t5 import T5Encoder
from wan.utils.tiny_tokenizer import make_tiny_tokenizer

from .loading import TASK_PRESETS, WAN_CONFIG

TINY_VOCAB = 64
TINY_T5 = dict(vocab=TINY_VOCAB, dim=32, dim_attn=32, dim_ffn=64, num_heads=2, num_layers=2, num_buckets=8,
               shared_pos=False, dropout=0.0)
TINY_CLIP = dict(image_size=28, patch_size=14, dim=32, mlp_ratio=2, out_dim=16, num_heads=2, num_layers=2)
TINY_CLIP_TOKENS = 1 + (28 // 14) ** 2
TINY_VAE = {"wan2.1": dict(dim=8), "wan2.2": dict(dim=8, dec_dim=8)}
TINY_DIT = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=32, text_dim=32, text_len=32,
                clip_dim=32, clip_tokens=TINY_CLIP_TOKENS)
# Sizes are "W*H" as the official CLI: multiples of VAE stride x patch size.
TINY_OVERRIDES = dict(sizes=["64*64", "96*64"], frame_num=9, sample_steps=4, text_len=32)


def _seeded(build, seed):
    torch.manual_seed(seed)
    return build()


def _dit_config(preset):
    config = {**preset.dit, **TINY_DIT}
    if preset.name == "ti2v-5B":
        config["num_heads"] = 2
    return config


def make_tiny_checkpoint(task, output_dir, seed=0, overrides=None):
    """Writes a complete tiny checkpoint folder for `task` (see `TASK_PRESETS`); returns its path.
    `overrides` (an extension family's tiny sizes, frame and step counts) update `TINY_OVERRIDES`."""
    if task not in TASK_PRESETS:
        raise ValueError(f"unknown task '{task}'; choose one of {', '.join(TASK_PRESETS)}")
    preset = get_preset(TASK_PRESETS[task][0])
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    dit_config = _dit_config(preset)
    expert_dirs = [folder / preset.files["high_noise_checkpoint"], folder / preset.files["low_noise_checkpoint"]] \
        if preset.is_moe else [folder]
    for i, expert_dir in enumerate(expert_dirs):
        save_dit(expert_dir, _seeded(lambda: WanModel(**dit_config), seed + i).state_dict(), dit_config, "WanModel")

    vae_config = TINY_VAE[preset.vae]
    vae = _seeded(lambda: VAE_CLASSES[preset.vae.removeprefix("wan")](**vae_config), seed + 10)
    torch.save(vae.state_dict(), folder / preset.vae_checkpoint)

    torch.save(_seeded(lambda: T5Encoder(**TINY_T5), seed + 20).state_dict(), folder / preset.files["t5_checkpoint"])
    make_tiny_tokenizer(folder / preset.files["t5_tokenizer"], vocab_size=TINY_VOCAB)
    extra = {"preset": preset.name, "overrides": {**TINY_OVERRIDES, **(overrides or {})}, "vae": vae_config,
             "t5": TINY_T5}
    if preset.use_clip:
        clip = _seeded(lambda: VisionTransformer(**TINY_CLIP), seed + 30)
        torch.save({f"visual.{k}": v for k, v in clip.state_dict().items()}, folder / preset.files["clip_checkpoint"])
        extra["clip"] = TINY_CLIP
    (folder / WAN_CONFIG).write_text(json.dumps(extra, indent=2))
    return folder
