"""Golden runners for VideoX-Fun's fp8 storage ("qfloat8"): kinds `fp8_linear`, `fp8_transformer`.

VideoX-Fun casts every parameter but `modulation` to float8_e4m3fn without a scale; a checkpoint
saved that way loads into our model (fp8 values upcast exactly) and `quantize_fp8` stores its linear
weights back in fp8 with scale 1, so the forward must equal theirs.
"""

import torch
import torch.nn as nn

from golden_kinds import EXT_DIR, assert_close, golden_dir, runner
from wan.checkpoint import load_state_dict
from wan.fp8 import FP8, FP8Linear, quantize_fp8
from wan.modules.model import WanModel

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


class RefConvModel(nn.Module):
    """VideoX-Fun's Wan2.2 control model with a reference image: `ref_conv` tokens of the reference
    latent are prepended as frame 0 (RoPE then places the video at frames 1..F) and dropped after
    the head. Composed from WanModel's stages for this case only."""

    def __init__(self, config):
        super().__init__()
        self.dit = WanModel.from_config({**config, "image_branch": False})
        self.ref_conv = nn.Conv2d(16, config["dim"], kernel_size=2, stride=2)

    def forward(self, x, t, context, y, full_ref):
        dit = self.dit
        tokens, grid = dit.embed_tokens(torch.cat([x, y], dim=1))
        ref = self.ref_conv(full_ref).flatten(2).transpose(1, 2)
        tokens = torch.cat([ref, tokens], dim=1)
        e, e0 = dit.embed_time(t, tokens.shape[1])
        rope = dit.rope((grid[0] + 1, *grid[1:]), tokens.device)
        tokens = dit.run_blocks(tokens, e0, rope, dit.embed_context(context))
        return dit.unpatchify(dit.head(tokens, e)[:, ref.shape[1]:], grid)


def fun_state_dict(params):
    """Golden keys (official + ref_conv) -> RefConvModel keys."""
    return {k if k.startswith("ref_conv.") else f"dit.{k}": v for k, v in params.items()}


def run_ref_conv_model(model, case):
    """VideoX-Fun's cfg_skip splits the [uncond, cond] batch into one call per half."""
    outs = []
    with torch.no_grad():
        for i in range(case.inputs["x"].shape[0]):
            outs.append(model(case.inputs["x"][i:i + 1], case.inputs["t"][i:i + 1], [case.inputs[f"context{i}"]],
                              case.inputs["y"][i:i + 1], case.inputs["full_ref"][i:i + 1]))
    return torch.cat(outs)


@runner("fp8_transformer")
def run_fp8_transformer(case):
    with torch.device("meta"):
        model = RefConvModel(case.config)
    load_state_dict(model, fun_state_dict(case.params), source=case.path.name)
    assert_close(run_ref_conv_model(model.eval(), case), case.outputs["out_unquantized"], atol=1e-4,
                 name=f"{case.path.name} unquantized")

    with torch.device("meta"):
        model = RefConvModel(case.config)
    load_state_dict(model, fun_state_dict(videox_fun_fp8(case.params)), source=case.path.name)
    names = quantize_fp8(model.dit)
    scales = {model.dit.get_submodule(n).scale_weight.item() for n in names}
    assert scales == {1.0}, f"weights read from an fp8 checkpoint must stay unscaled, got scales {scales}"
    assert_close(run_ref_conv_model(model.eval(), case), case.outputs["out"], atol=1e-4, name=case.path.name)
