"""Golden runners for VideoX-Fun's fp8 storage ("qfloat8"): kinds `fp8_linear`, `fp8_transformer`.

VideoX-Fun casts every parameter but `modulation` to float8_e4m3fn without a scale; a checkpoint
saved that way loads into our model (fp8 values upcast exactly) and `quantize_fp8` stores its linear
weights back in fp8 with scale 1, so the forward must equal theirs.
"""

from dataclasses import replace

import torch
import torch.nn as nn

from golden_kinds import EXT_DIR, assert_close, golden_dir, runner
from golden_kinds.fun import build_fun_model
from wan.fp8 import FP8, FP8Linear, quantize_fp8

golden_dir(EXT_DIR / "fun" / "golden", "fp8_linear", "fp8_transformer")


def videox_fun_fp8(params):
    """A state dict as `convert_model_weight_to_float8(exclude_module_name=["modulation"])` stores it."""
    return {k: v if "modulation" in k else v.to(FP8) for k, v in params.items()}


@runner("fp8_linear")
def run_fp8_linear(case):
    config = case.config
    linear = nn.Linear(config["in_features"], config["out_features"])
    fp8 = videox_fun_fp8({k.removeprefix("0."): v for k, v in case.params.items()})
    linear.load_state_dict({k: v.float() for k, v in fp8.items()})
    layer = FP8Linear.from_linear(linear)
    assert layer.weight.dtype == FP8 and layer.scale_weight.item() == 1.0, "fp8 checkpoint weight must load unscaled"
    assert_close(layer.dequantized_weight(torch.float32), case.outputs["weight_fp8"], atol=0, name="weight_fp8")
    assert_close(layer.bias, case.outputs["bias_fp8"], atol=0, name="bias_fp8")
    with torch.no_grad():
        assert_close(layer(case.inputs["x"]), case.outputs["y"], atol=1e-4, name="y")


def run_ref_conv_model(model, case):
    """VideoX-Fun's cfg_skip splits the [uncond, cond] batch into one call per half."""
    outs = []
    with torch.no_grad():
        for i in range(case.inputs["x"].shape[0]):
            outs.append(model(case.inputs["x"][i:i + 1], case.inputs["t"][i:i + 1], [case.inputs[f"context{i}"]],
                              y=case.inputs["y"][i:i + 1], full_ref=case.inputs["full_ref"][i:i + 1]))
    return torch.cat(outs)


@runner("fp8_transformer")
def run_fp8_transformer(case):
    model = build_fun_model(case)
    assert_close(run_ref_conv_model(model, case), case.outputs["out_unquantized"], atol=1e-4,
                 name=f"{case.path.name} unquantized")

    model = build_fun_model(replace(case, params=videox_fun_fp8(case.params)))
    names = quantize_fp8(model)
    scales = {model.get_submodule(n).scale_weight.item() for n in names}
    assert scales == {1.0}, f"weights read from an fp8 checkpoint must stay unscaled, got scales {scales}"
    assert_close(run_ref_conv_model(model, case), case.outputs["out"], atol=1e-4, name=case.path.name)
