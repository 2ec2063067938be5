"""Trainers, chosen by the config's `trainer:` name; all run in the shared loop (`trainers.loop.train`).

A trainer class is registered with `@register_trainer("name")` and provides:
    config_problems(cfg) (classmethod): its own config errors, as strings (checked before any work)
    __init__(cfg, device): builds its models, the trainable one on the meta device
    model: the trainable nn.Module (checkpointed, sharded, EMA'd and saved by the loop)
    initial_state(): the full state dict `model` starts from (called on rank 0 only)
    frozen_modules(): frozen nn.Modules the loop may shard (encoders)
    export(state, folder, suffix=""): writes gathered trainable weights for inference
    loss(batch, generator) -> (loss, {"tokens": n, ...}): one micro-batch; its randomness from `generator`;
        other metrics (floats) are logged beside the loss
and optionally:
    dataset(): its own dataset (a `trainers.data.SampleSet`) instead of `build_dataset(cfg.data)`
    defaults: a YAML file of config sections of its own, merged into the defaults when it is chosen
    open_maps: keys of those sections that take free-form entries (as `model.config`)
A trainer of several networks (trainers/distillation.py) makes `model` an nn.ModuleDict of them,
trained in turns (trainers/loop.py), and provides:
    optimizer_settings(name): AdamW settings of that network over `optimizer` (e.g. {"lr": ...})
    phase(step): the name of the network optimizer step `step` trains
    loss(batch, generator, phase): that network's loss
    ema_network: the name of the network the EMA follows
"""

TRAINERS = {}


def register_trainer(name):
    def register(cls):
        if name in TRAINERS:
            raise ValueError(f"trainer '{name}' is already registered")
        TRAINERS[name] = cls
        cls.name = name
        return cls
    return register


from . import diffusion, distillation, fun, multiref, ode, pose, stableavatar  # noqa: E402,F401  (registers the trainers)
