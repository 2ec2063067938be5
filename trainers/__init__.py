"""Trainers, chosen by the config's `trainer:` name; all run in the shared loop (`trainers.loop.train`).

A trainer class is registered with `@register_trainer("name")` and provides:
    config_problems(cfg) (classmethod): its own config errors, as strings (checked before any work)
    __init__(cfg, device): builds its models, the trainable one on the meta device
    model: the trainable nn.Module (checkpointed, sharded, EMA'd and saved by the loop)
    initial_state(): the full state dict `model` starts from (called on rank 0 only)
    frozen_modules(): frozen nn.Modules the loop may shard (encoders)
    export(state, folder, suffix=""): writes gathered trainable weights for inference
    loss(batch, generator) -> (loss, {"tokens": n}): one micro-batch; its randomness from `generator`
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


from . import diffusion, distillation, ode  # noqa: E402,F401  (registers the trainers)
