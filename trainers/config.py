"""Training configs: a YAML or TOML file merged over configs/default_config.yaml, then dotted
command-line overrides; validated in full before any work starts."""

import tomllib
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from wan.configs import get_preset
from wan.model_loading import read_dit_config

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default_config.yaml"
OPEN_MAPS = ("model.config", "encoders.vae_config", "encoders.t5_config", "encoders.clip_config")
DATA_KINDS = ("prompts", "videos", "json", "latents")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class ConfigError(ValueError):
    """A training config is invalid; the message lists every problem found."""


def read_config_file(path):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.suffix == ".toml":
        with open(path, "rb") as f:
            data = tomllib.load(f)
        from .multiref import config_from_pipe_toml, is_pipe_toml

        return OmegaConf.create(config_from_pipe_toml(data, path) if is_pipe_toml(data) else data)
    return OmegaConf.load(path)


def load_config(path=None, overrides=(), world_size=1):
    """The config of a run: defaults <- file at `path` <- `overrides` ("a.b=value"), validated."""
    cfg = OmegaConf.load(DEFAULT_CONFIG)
    layers = ([read_config_file(path)] if path else []) + [OmegaConf.from_dotlist(list(overrides))]
    trainer = trainer_class(next((layer.trainer for layer in reversed(layers) if "trainer" in layer), cfg.trainer))
    if getattr(trainer, "defaults", None):  # a trainer's own config sections
        cfg = OmegaConf.merge(cfg, OmegaConf.load(trainer.defaults))
    OmegaConf.set_struct(cfg, True)
    for key in OPEN_MAPS + getattr(trainer, "open_maps", ()):
        OmegaConf.set_struct(OmegaConf.select(cfg, key), False)
    try:
        cfg = OmegaConf.merge(cfg, *layers)
    except ConfigKeyError as e:
        raise ConfigError(f"unknown config key: {str(e).splitlines()[0]} (keys: {DEFAULT_CONFIG})") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad config value: {e}") from None
    validate(cfg, world_size)
    return cfg


def trainer_class(name):
    """The registered trainer class of that name, or None."""
    from . import TRAINERS

    return TRAINERS.get(name)


def dit_config(model_cfg):
    """WanModel arguments of the run: the preset's (or the checkpoint's config.json), then `model.config`."""
    if model_cfg.preset:
        base = dict(get_preset(model_cfg.preset).dit)
    else:
        base = read_dit_config(Path(model_cfg.checkpoint).parent if Path(model_cfg.checkpoint).is_file()
                               else model_cfg.checkpoint)
        if base is None:
            raise ConfigError(f"model.preset is null and no config.json is beside {model_cfg.checkpoint}")
    base.update(OmegaConf.to_container(model_cfg.config))
    return base


def _problems(cfg, world_size):
    from . import TRAINERS

    if cfg.trainer not in TRAINERS:
        yield f"unknown trainer '{cfg.trainer}'; registered trainers: {', '.join(sorted(TRAINERS))}"
    yield from model_problems(cfg.model, "model")
    for key in ("model.frozen_dtype", "train.mixed_precision", "encoders.dtype", "checkpoint.export_dtype"):
        if OmegaConf.select(cfg, key) not in DTYPES:
            yield f"{key} must be one of {sorted(DTYPES)}, got {OmegaConf.select(cfg, key)!r}"

    data = cfg.data
    if data.kind not in DATA_KINDS:
        yield f"unknown data.kind '{data.kind}'; expected one of {DATA_KINDS}"
    elif data.path is None:
        yield f"data.path is not set (data.kind {data.kind})"
    elif not Path(data.path).exists():
        yield f"data.path not found: {data.path}"
    if (data.num_frames - 1) % 4:
        yield f"data.num_frames must be 4n + 1 (the VAE's temporal stride), got {data.num_frames}"

    train = cfg.train
    per_step = train.batch_size * world_size
    if train.total_batch_size % per_step:
        yield (f"train.total_batch_size {train.total_batch_size} is not divisible by train.batch_size "
               f"{train.batch_size} x {world_size} process(es) = {per_step}")
    if train.ema_weight is not None and not 0 <= train.ema_weight < 1:
        yield f"train.ema_weight must be in [0, 1), got {train.ema_weight}"
    if cfg.checkpoint.every < 1 or train.max_steps < 1:
        yield "checkpoint.every and train.max_steps must be >= 1"

    if cfg.lora.enabled:
        yield from _lora_problems(cfg)
    if cfg.trainer in TRAINERS:
        yield from TRAINERS[cfg.trainer].config_problems(cfg)


def model_problems(section, key):
    """Problems of a DiT config section (preset, config, checkpoint) found at `key`."""
    if section.preset is None and section.checkpoint is None:
        yield f"set {key}.preset or {key}.checkpoint (a folder with config.json)"
    if section.preset is not None:
        try:
            get_preset(section.preset)
        except KeyError as e:
            yield str(e.args[0])
    if section.checkpoint is not None and not Path(section.checkpoint).exists():
        yield f"{key}.checkpoint not found: {section.checkpoint}"


def probability_problems(section, key, names):
    """Problems of the entries `names` of a config section (found at `key`) that are not in [0, 1]."""
    for name in names:
        if not 0 <= section[name] <= 1:
            yield f"{key}.{name} must be a probability in [0, 1], got {section[name]}"


def _lora_problems(cfg):
    from wan.lora import INITS, match_modules
    from wan.modules.model import WanModel

    if cfg.lora.init not in INITS:
        yield f"lora.init must be one of {INITS}, got '{cfg.lora.init}'"
    try:
        with torch.device("meta"):
            model = WanModel.from_config(dit_config(cfg.model))
        match_modules(model, list(cfg.lora.targets))
    except (ValueError, KeyError) as e:
        yield str(e)


def validate(cfg, world_size=1):
    """Raises one ConfigError listing every problem of `cfg`."""
    problems = list(_problems(cfg, world_size))
    if problems:
        raise ConfigError("invalid training config:\n  - " + "\n  - ".join(problems))
