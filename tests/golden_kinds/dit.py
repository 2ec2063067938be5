"""Golden runner for kind `dit`: WanModel forward against the official model."""

import math

import torch

from golden_kinds import assert_close, runner
from wan.checkpoint import load_state_dict
from wan.modules.model import WanModel


def build_dit(case):
    with torch.device("meta"):
        model = WanModel.from_config(case.config)
    return load_state_dict(model, case.params, source=case.path.name).eval()


def sample_inputs(case, i, model):
    """The i-th sample of a (possibly mixed-size) reference batch, as a batch of one."""
    x = case.inputs[f"x{i}"][None]
    grid = [s // p for s, p in zip(x.shape[2:], model.patch_size)]
    t = case.inputs["t"]
    t = t[i:i + 1] if t.ndim == 1 else t[i:i + 1, :math.prod(grid)]
    kwargs = {}
    if f"y{i}" in case.inputs:
        kwargs["y"] = case.inputs[f"y{i}"][None]
    if "clip_fea" in case.inputs:
        per_sample = 2 if model.model_type == "flf2v" else 1
        kwargs["clip_fea"] = case.inputs["clip_fea"][per_sample * i:per_sample * (i + 1)]
    return x, t, case.inputs[f"context{i}"][None], kwargs


@runner("dit")
def run_dit(case):
    model = build_dit(case)
    num_samples = len([k for k in case.inputs if k.startswith("x")])
    with torch.no_grad():
        for i in range(num_samples):
            x, t, context, kwargs = sample_inputs(case, i, model)
            out = model(x, t, context, **kwargs)
            assert_close(out[0], case.outputs[f"out{i}"], atol=1e-4, name=f"{case.path.name} out{i}")
