"""A3 training: a LoRA (or full fine-tune) of an A2 / Wan2.1-I2V model conditioned on an object image,
an optional edge/placement mask and an optional background (`pipelines.references.A3_SLOTS`).

Data: a folder of `NNN.mp4`, `NNN.txt`, `NNN_object.png` (required) and `NNN_mask.png`,
`NNN_background.png` (optional). A sample with a required file missing is reported by name and
skipped. Each step drops the mask and the background of each sample with the configured
probabilities: a dropped (or absent) reference adds no CLIP tokens and leaves its latent frame
unknown (mask 0), exactly as at inference.

The training clip is laid out as at inference: the 3 reference slots take the first 9 pixel frames
(`[object, mask x4, background x4]`, grey where a slot is empty), the video's frames follow, and the
whole clip is the target; the condition `y` holds the encoded reference frames with the mask.
Reference latents are the posterior mean (deterministic, so they can be cached).

Latent caching (`multiref.cache_latents`): before training, each sample not cached yet is encoded once
(its latents for the four drop patterns, its text context and its CLIP tokens) into
`<folder>/latent_cache_<H>x<W>x<frames>/NNN.safetensors`; training then reads only the cache.

Configs: the shared YAML/TOML schema with `trainer: multiref`, or a diffusion-pipe style TOML
(`output_dir`, `dataset = '<dataset>.toml'`, `[model]`, `[adapter]`, `[optimizer]`) that
`config_from_pipe_toml` maps onto it (see configs/a3_lora.toml).

fp8 base (`multiref.fp8_base`, the TOML's `transformer_dtype = 'float8'`): the frozen linear weights
of the blocks are stored as float8 (`wan.fp8.quantize_fp8`, one scale per tensor) and dequantized in
each matmul; the LoRA-wrapped layers keep their base weight in `model.frozen_dtype` and the LoRA
weights stay fp32.
"""

import json
import logging
import os
import random
import re
import tomllib
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from pipelines.loading import read_wan_config
from pipelines.references import (A3_SLOTS, clip_pixels, latent_mask, load_rgb, reference_frame_count,
                                  reference_video, vae_pixels)
from pipelines.video_io import count_frames, read_frames_at
from wan.checkpoint import read_checkpoint_keys, save_state_dict
from wan.convert.dit_diffusers import DIT_DIFFUSERS_TABLE
from wan.convert.encoders_hf import clip_config_from_hf, t5_config_from_hf
from wan.convert_vae import config_from_diffusers as vae_config_from_diffusers
from wan.fp8 import dit_linear_filter, quantize_fp8, quantize_state_dict
from wan.lora import save_lora_diffusers
from wan.modules.multiref import MultiReferenceDiT, ReferenceTokens

from . import register_trainer
from .config import ConfigError, probability_problems
from .data import SampleSet, sample_frame_indices, to_clip
from .diffusion import DiffusionTrainer

log = logging.getLogger(__name__)

DEFAULTS = Path(__file__).resolve().parents[1] / "configs" / "multiref_defaults.yaml"
REQUIRED = ("{}.mp4", "{}.txt", "{}_object.png")
OPTIONAL = {"mask": "{}_mask.png", "background": "{}_background.png"}
# The four drop patterns of the optional slots (mask kept, background kept), as cache keys.
PATTERNS = ((1, 1), (1, 0), (0, 1), (0, 0))


def pattern_key(name, mask, background):
    return f"{name}_{mask}{background}"


def slot_frame_count(temporal_stride=4):
    """Pixel frames the A3 slots take at the start of every clip (9)."""
    return reference_frame_count(len(A3_SLOTS), temporal_stride=temporal_stride)


# -- data --------------------------------------------------------------------------------------------


def scan_folder(folder):
    """Sample names (NNN) with all required files; each incomplete sample is reported by name."""
    folder = Path(folder)
    names = sorted({m.group(1) for p in folder.iterdir()
                    if (m := re.match(r"^(\d+)(?:_(?:object|mask|background))?\.(?:mp4|txt|png)$", p.name))})
    complete = []
    for name in names:
        missing = [pattern.format(name) for pattern in REQUIRED if not (folder / pattern.format(name)).exists()]
        if missing:
            log.warning("skipping sample %s: missing %s", name, ", ".join(missing))
        else:
            complete.append(name)
    if not complete:
        raise ValueError(f"no complete sample in {folder}: each needs NNN.mp4, NNN.txt and NNN_object.png")
    return complete


class ReferenceVideoDataset(SampleSet):
    """Clips with their caption and reference images (or, once cached, their encodings).

    A raw sample: `video` [3, frames - 9, H, W] in [-1, 1], `text`, `ref_vae` [3 slots, 3, H, W],
    `ref_clip` [3 slots, 3, S, S], `present` [3] (slot given), `name`. A cached sample: `latents_MB`
    and `y_MB` for the four drop patterns (M, B: mask, background kept), `context`, `clip_<slot>`,
    `present`, `name`.
    """

    def __init__(self, folder, num_frames, frame_stride, height, width, clip_size, seed=0, cache_dir=None):
        self.folder, self.seed, self.cache_dir = Path(folder), seed, cache_dir and Path(cache_dir)
        self.video_frames = num_frames - slot_frame_count()
        self.frame_stride, self.height, self.width, self.clip_size = frame_stride, height, width, clip_size
        self.names = scan_folder(folder)
        self.buckets = [(num_frames, height, width)] * len(self.names)

    def describe(self, index):
        return str(self.folder / f"{self.names[index]}.mp4")

    def cache_path(self, name):
        return self.cache_dir / f"{name}.safetensors" if self.cache_dir else None

    def load(self, index, epoch):
        name = self.names[index]
        cached = self.cache_path(name)
        if cached is not None and cached.exists():
            from safetensors.torch import load_file

            return {**load_file(cached), "name": name}
        # a cached clip is the one of epoch 0: every epoch then reads the same clip
        rng = random.Random(f"{self.seed}/{0 if cached else epoch}/{index}")
        path = self.folder / f"{name}.mp4"
        indices = sample_frame_indices(count_frames(path), self.video_frames, self.frame_stride, rng)
        video = to_clip(read_frames_at(path, indices), self.height, self.width)
        images = [load_rgb(self.folder / f"{name}_object.png")]
        for pattern in OPTIONAL.values():
            file = self.folder / pattern.format(name)
            images.append(load_rgb(file) if file.exists() else None)
        zeros = torch.zeros(3, self.height, self.width), torch.zeros(3, self.clip_size, self.clip_size)
        return {"video": video, "text": (self.folder / f"{name}.txt").read_text().strip(), "name": name,
                "present": torch.tensor([image is not None for image in images]),
                "ref_vae": torch.stack([zeros[0] if im is None else vae_pixels(im, self.height, self.width, slot)
                                        for slot, im in zip(A3_SLOTS, images)]),
                "ref_clip": torch.stack([zeros[1] if im is None else clip_pixels(im, self.clip_size, slot.fill)
                                         for slot, im in zip(A3_SLOTS, images)])}


def draw_dropout(present, mask_dropout, background_dropout, generator):
    """present: [B, 3] bool -> [B, 3] bool, the slots kept this step (the object always is)."""
    draws = torch.rand(present.shape[0], 2, generator=generator, device=generator.device).cpu()
    keep = torch.ones_like(present)
    keep[:, 1] = draws[:, 0] >= mask_dropout
    keep[:, 2] = draws[:, 1] >= background_dropout
    return present & keep


# -- trainer -----------------------------------------------------------------------------------------


def frozen_block_linear(name, module):
    """The fp8 base's selection: the blocks' frozen linear layers (not the LoRA adapters' lora_A / lora_B)."""
    return dit_linear_filter(name, module) and not module.weight.requires_grad


@register_trainer("multiref")
class MultiReferenceTrainer(DiffusionTrainer):
    """The diffusion trainer with A3's reference conditioning and dropout (see the module docstring)."""

    defaults = DEFAULTS

    @classmethod
    def config_problems(cls, cfg):
        if cfg.data.kind != "videos":
            yield "the multiref trainer reads a folder of NNN.mp4 / NNN.txt / NNN_object.png: set data.kind to videos"
        yield from super().config_problems(cfg)
        yield from probability_problems(cfg.multiref, "multiref", ("mask_dropout", "background_dropout"))
        if cfg.data.num_frames <= slot_frame_count():
            yield (f"data.num_frames must leave frames after the {slot_frame_count()} reference frames: "
                   f"13, 17, ... (4n + 1), got {cfg.data.num_frames}")
        if cfg.encoders.clip_checkpoint is None:
            yield "the multiref trainer needs the CLIP image encoder: set encoders.clip_checkpoint"
        if cfg.multiref.fp8_base and not cfg.lora.enabled:
            yield "multiref.fp8_base stores the frozen base in fp8: it needs a LoRA (lora.enabled), not a full fine-tune"

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        # the base trainer would feed raw batches to its encoders; here `loss` prepares the inputs
        self.frozen, self.encoders = self.encoders, None
        self.model = MultiReferenceDiT(self.dit_model)
        self.prefix = "model."
        self.options = cfg.multiref
        self.fp8_names = quantize_fp8(self.dit_model, select=frozen_block_linear) if cfg.multiref.fp8_base else []

    def initial_state(self):
        state = super().initial_state()
        return quantize_state_dict(state, [self.prefix + n for n in self.fp8_names]) if self.fp8_names else state

    def frozen_modules(self):
        return self.frozen.modules()

    def dataset(self):
        """The loop's dataset (instead of `trainers.data.build_dataset`); with latent caching, every
        sample is encoded first, so that batches are all cached."""
        data, cache = self.cfg.data, self.cache_dir()
        dataset = ReferenceVideoDataset(data.path, data.num_frames, data.frame_stride, data.height, data.width,
                                        self.frozen.clip.model.image_size, self.cfg.seed, cache)
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            self.fill_cache(dataset)
        return dataset

    def fill_cache(self, dataset):
        """Encodes the samples not cached yet, each process its share; unreadable ones are reported."""
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        todo = [i for i in range(rank, len(dataset), world) if not dataset.cache_path(dataset.names[i]).exists()]
        for index in tqdm(todo, desc="caching latents", disable=not todo):
            try:
                sample = dataset.load(index, epoch=0)
            except Exception as e:  # any decoding error: report, the loader skips it later
                log.warning("not caching unreadable sample %s: %s: %s", dataset.describe(index), type(e).__name__, e)
                continue
            self.cache_sample(sample, dataset.cache_dir)
        if dist.is_initialized():
            dist.barrier()
        log.info("latent cache %s: %d sample(s) encoded now", dataset.cache_dir, len(todo))

    def export(self, state, folder, suffix=""):
        """Also writes the LoRA under diffusers' module names (`lora_diffusers*.safetensors`), which diffusers'
        `load_lora_weights` / `load_lora_adapter` read into the A2 transformer."""
        super().export(state, folder, suffix)
        if self.lora:
            state = {k[len(self.prefix):]: v for k, v in state.items()}
            save_lora_diffusers(self.dit_model, folder / f"lora_diffusers{suffix}.safetensors", tensors=state)

    # -- encoding ------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_pattern(self, sample, keep):
        """Target latents and condition `y` of one raw sample with the slots `keep` [3] bool."""
        vae = self.frozen.vae
        slots = [image if kept else None for image, kept in zip(sample["ref_vae"], keep.tolist())]
        refs, known = reference_video(slots, slot_frame_count(vae.temporal_stride), temporal_stride=vae.temporal_stride)
        target = torch.cat([refs, sample["video"]], dim=1)
        condition = torch.cat([refs, torch.zeros_like(sample["video"])], dim=1)
        latents = vae.encode(torch.stack([target, condition]).to(self.device)).float()
        known = torch.cat([known, torch.zeros(sample["video"].shape[1])])
        mask = latent_mask(known, *latents.shape[-2:], vae.temporal_stride).to(latents)
        return latents[0], torch.cat([mask, latents[1]])

    @torch.no_grad()
    def encode_shared(self, sample):
        """Text context and per-slot CLIP tokens of one raw sample."""
        clip = self.frozen.clip
        tokens = clip.model(sample["ref_clip"].to(self.device, clip.model.patch_embedding.weight.dtype)).float()
        shared = {f"clip_{slot.name}": tokens[i] for i, slot in enumerate(A3_SLOTS)}
        shared["context"] = self.frozen.t5.encode([sample["text"]], self.device)[0].float()
        return shared

    def cache_sample(self, sample, dataset_cache):
        """Encodes all four drop patterns of a raw sample and saves them."""
        cached = {**self.encode_shared(sample), "present": sample["present"]}
        for mask, background in PATTERNS:
            keep = sample["present"] & torch.tensor([True, bool(mask), bool(background)])
            cached[pattern_key("latents", mask, background)], cached[pattern_key("y", mask, background)] = \
                self.encode_pattern(sample, keep)
        save_state_dict({k: v.cpu().contiguous() for k, v in cached.items()}, dataset_cache / f"{sample['name']}.safetensors")

    def prepare(self, batch, generator):
        """A batch (raw or cached) -> the base trainer's inputs, with this step's dropout drawn from `generator`."""
        samples = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["name"]))]
        keep = draw_dropout(batch["present"], self.options.mask_dropout, self.options.background_dropout, generator)
        latents, ys, contexts, tokens = [], [], [], []
        for sample, kept in zip(samples, keep):
            if "context" in sample:  # cached: pick the drop pattern
                kept_mask, kept_background = int(kept[1]), int(kept[2])
                latent = sample[pattern_key("latents", kept_mask, kept_background)]
                y = sample[pattern_key("y", kept_mask, kept_background)]
                sample_tokens = {k: v for k, v in sample.items() if k.startswith("clip_")}
                context = sample["context"]
            else:
                latent, y = self.encode_pattern(sample, kept)
                shared = self.encode_shared(sample)
                sample_tokens, context = shared, shared["context"]
            latents.append(latent)
            ys.append(y)
            contexts.append(context)
            tokens.append(torch.cat([sample_tokens[f"clip_{slot.name}"] for slot, k in zip(A3_SLOTS, kept) if k]))
        inputs = {"latents": torch.stack(latents), "y": torch.stack(ys), "context": contexts,
                  "clip_fea": ReferenceTokens.from_list(tokens)}
        rates = {"mask_dropped": float((batch["present"][:, 1] & ~keep[:, 1]).sum() / len(keep)),
                 "background_dropped": float((batch["present"][:, 2] & ~keep[:, 2]).sum() / len(keep))}
        return inputs, rates

    def cache_dir(self):
        if not self.options.cache_latents:
            return None
        data = self.cfg.data
        return Path(self.options.cache_dir or Path(data.path) / f"latent_cache_{data.height}x{data.width}x{data.num_frames}")

    def loss(self, batch, generator):
        inputs, rates = self.prepare(batch, generator)
        loss, metrics = super().loss(inputs, generator)
        return loss, {**metrics, **rates}


# -- diffusion-pipe style TOML ------------------------------------------------------------------------

PIPE_TOP_LEVEL = {"output_dir", "dataset", "model", "adapter", "optimizer", "seed", "max_steps",
                  "micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping", "warmup_steps",
                  "save_every_n_steps", "activation_checkpointing", "train", "diffusion", "checkpoint", "logging"}
FROZEN_DTYPES = {"bfloat16": "bf16", "float32": "fp32", "float8": "float8"}
COMPUTE_DTYPES = {"bfloat16": "bf16", "float32": "fp32"}


def is_pipe_toml(data):
    return "adapter" in data or "dataset" in data or "output_dir" in data


def official_target(pattern):
    """A LoRA target glob in official names (`blocks.*.cross_attn.k_img`) or diffusers names
    (`blocks.*.attn2.add_k_proj`, through the DiT key table) -> the official glob."""
    if pattern.startswith("transformer."):
        pattern = pattern[len("transformer."):]
    if ".attn1." in pattern or ".attn2." in pattern or pattern.startswith(("condition_embedder.", "proj_out")):
        return next(iter(DIT_DIFFUSERS_TABLE.to_source({pattern + ".weight": None})))[:-len(".weight")]
    return pattern


def _read_json(path):
    return json.loads(Path(path).read_text())


def model_sections(ckpt_path):
    """`model` and `encoders` sections for an A2 (diffusers layout) or official Wan2.1-I2V folder."""
    folder = Path(ckpt_path)
    if not (folder / "model_index.json").exists():
        raise ConfigError(f"model.ckpt_path {folder} is not an A2 checkpoint folder (diffusers layout with "
                          f"model_index.json, transformer/, vae/, text_encoder/, tokenizer/, image_encoder/)")
    missing = [n for n in ("transformer", "vae", "text_encoder", "tokenizer", "image_encoder") if not (folder / n).exists()]
    if missing:
        raise ConfigError(f"model.ckpt_path {folder} lacks {', '.join(missing)}")
    overrides = read_wan_config(folder).get("overrides", {})
    _, vae_config = vae_config_from_diffusers(_read_json(folder / "vae" / "config.json"))
    has_projection = any(k.startswith("visual_projection") for k in read_checkpoint_keys(folder / "image_encoder"))
    model = {"preset": None, "checkpoint": str(folder / "transformer"),
             "config": {"text_len": overrides.get("text_len", 512)}}
    encoders = {"vae_checkpoint": str(folder / "vae"), "vae_config": vae_config,
                "t5_checkpoint": str(folder / "text_encoder"), "t5_tokenizer": str(folder / "tokenizer"),
                "t5_config": t5_config_from_hf(_read_json(folder / "text_encoder" / "config.json")),
                "clip_checkpoint": str(folder / "image_encoder"),
                "clip_config": clip_config_from_hf(_read_json(folder / "image_encoder" / "config.json"), has_projection)}
    return model, encoders


def _choice(value, choices, key):
    if value not in choices:
        raise ConfigError(f"{key} must be one of {sorted(choices)}, got {value!r}")
    return choices[value]


def dataset_sections(path):
    """`data` and `multiref` sections from a dataset TOML (directory, resolution, frames, stride,
    mask_dropout, background_dropout, cache_latents)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"dataset file not found: {path}")
    with open(path, "rb") as f:
        d = tomllib.load(f)
    known = {"directory", "resolution", "frames", "stride", "mask_dropout", "background_dropout", "cache_latents",
             "num_workers"}
    if set(d) - known:
        raise ConfigError(f"{path}: unknown key(s) {sorted(set(d) - known)}; known: {sorted(known)}")
    if "directory" not in d:
        raise ConfigError(f"{path}: set directory = '<folder of NNN.mp4, NNN.txt, NNN_object.png>'")
    directory = Path(d["directory"])
    directory = directory if directory.is_absolute() else path.parent / directory
    resolution = d.get("resolution", [480, 832])
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    data = {"kind": "videos", "path": str(directory), "height": height, "width": width,
            "num_frames": d.get("frames", 49), "frame_stride": d.get("stride", 1)}
    if "num_workers" in d:
        data["num_workers"] = d["num_workers"]
    multiref = {"mask_dropout": d.get("mask_dropout", 0.3), "background_dropout": d.get("background_dropout", 0.3),
                "cache_latents": d.get("cache_latents", False)}
    return data, multiref


def config_from_pipe_toml(data, path):
    """A diffusion-pipe style training TOML -> the shared config schema (trainer multiref).

    Top level: output_dir, dataset (a dataset TOML, relative to this file), seed, max_steps,
    micro_batch_size_per_gpu, gradient_accumulation_steps, gradient_clipping, warmup_steps,
    save_every_n_steps, activation_checkpointing. [model]: ckpt_path (an A2 folder), dtype (compute),
    transformer_dtype (storage of the frozen weights: bfloat16, float32 or float8). [adapter]: type
    'lora', rank, alpha, dtype, target_modules (official or diffusers module names, `*` globs).
    [optimizer]: type 'adamw', lr, betas, weight_decay, eps. [train], [diffusion], [checkpoint],
    [logging] pass through in the shared schema.
    """
    path = Path(path)
    unknown = set(data) - PIPE_TOP_LEVEL
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; known: {sorted(PIPE_TOP_LEVEL)}")
    for key in ("output_dir", "dataset", "model", "adapter"):
        if key not in data:
            raise ConfigError(f"{path}: '{key}' is missing")
    relative = lambda p: str(p if Path(p).is_absolute() else path.parent / p)  # noqa: E731
    m = data["model"]
    if "ckpt_path" not in m:
        raise ConfigError(f"{path}: [model] needs ckpt_path (the A2 checkpoint folder)")
    model, encoders = model_sections(m["ckpt_path"])
    frozen = _choice(m.get("transformer_dtype", m.get("dtype", "bfloat16")), FROZEN_DTYPES, "model.transformer_dtype")
    compute = _choice(m.get("dtype", "bfloat16"), COMPUTE_DTYPES, "model.dtype")
    # float8: the blocks' linear weights in fp8, the other frozen weights in the compute dtype
    model["frozen_dtype"] = compute if frozen == "float8" else frozen
    if "activation_checkpointing" in data:
        model["gradient_checkpointing"] = bool(data["activation_checkpointing"])

    a = data["adapter"]
    if a.get("type", "lora") != "lora":
        raise ConfigError(f"adapter.type must be 'lora', got {a.get('type')!r}")
    if a.get("dtype", "float32") not in ("float32", "bfloat16"):
        raise ConfigError(f"adapter.dtype must be 'float32' or 'bfloat16', got {a.get('dtype')!r}")
    targets = a.get("target_modules", ["blocks.*.cross_attn.k_img", "blocks.*.cross_attn.v_img"])
    lora = {"enabled": True, "rank": a.get("rank", 16), "alpha": a.get("alpha"),
            "targets": [official_target(t) for t in ([targets] if isinstance(targets, str) else targets)]}

    o = data.get("optimizer", {})
    if o.get("type", "adamw").lower() not in ("adamw", "adamw_optimi", "adamw8bitkahan"):
        raise ConfigError(f"optimizer.type must be 'adamw', got {o.get('type')!r}")
    optimizer = {k: o[k] for k in ("lr", "betas", "weight_decay", "eps") if k in o}
    optimizer.update({k: data[v] for k, v in (("grad_clip", "gradient_clipping"), ("warmup_steps", "warmup_steps"))
                      if v in data})

    micro = data.get("micro_batch_size_per_gpu", 1)
    world = int(os.environ.get("WORLD_SIZE", 1))
    train = {"batch_size": micro, "total_batch_size": micro * data.get("gradient_accumulation_steps", 1) * world,
             "mixed_precision": compute}
    if "max_steps" in data:
        train["max_steps"] = data["max_steps"]
    dataset, multiref = dataset_sections(relative(data["dataset"]))
    multiref["fp8_base"] = frozen == "float8"
    config = {"trainer": "multiref", "output_dir": relative(data["output_dir"]), "model": model, "lora": lora,
              "data": dataset, "encoders": encoders, "optimizer": optimizer, "multiref": multiref,
              "train": {**train, **data.get("train", {})}}
    if a.get("dtype") == "bfloat16":
        log.info("adapter.dtype bfloat16: LoRA master weights stay fp32 (AdamW); compute follows model.dtype")
    if "seed" in data:
        config["seed"] = data["seed"]
    if "save_every_n_steps" in data:
        config["checkpoint"] = {"every": data["save_every_n_steps"]}
    for section in ("diffusion", "checkpoint", "logging"):
        if section in data:
            config[section] = {**config.get(section, {}), **data[section]}
    return config
