"""Trainers, chosen by the config's `trainer:` name; all run in the shared loop (`trainers.loop.train`).

A trainer class is registered with `@register_trainer("name")` and provides:
    config_problems(cfg) (classmethod): config errors specific to it, as strings
    __init__(cfg, device): builds its models (on the CPU, in fp32 for the trainable one)
    model: the trainable nn.Module (sharded, checkpointed and EMA'd by the loop)
    frozen_modules(): frozen nn.Modules the loop may shard (encoders)
    export(state, folder): writes the gathered trainable weights for inference
    loss(batch, generator) -> (loss, metrics dict): one micro-batch; all randomness from `generator`
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


from . import diffusion  # noqa: E402,F401  (registers the trainers)
