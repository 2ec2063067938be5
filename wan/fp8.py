"""FP8 weight storage for the DiT: linear weights kept as float8_e4m3fn, dequantized in the matmul.

A 14B DiT is 28 GB in bf16 and 14 GB in fp8, so it fits a 24 GB GPU with room for activations.
`quantize_fp8(model)` is applied from outside the model (like FSDP or LoRA): it replaces the
selected `nn.Linear` modules by `FP8Linear`, which stores its weight in fp8 with one fp32 scale per
tensor (`weight ~= weight_fp8 * scale_weight`) and computes in the dtype of its input.

Checkpoints already stored in fp8 without a scale (VideoX-Fun's `convert_model_weight_to_float8`,
the `*_fp8_e4m3fn.safetensors` files of the community) load as usual: their fp8 tensors are upcast
to the model dtype exactly, and `quantize_fp8` then stores every weight whose values are all fp8
numbers with scale 1, i.e. bit for bit as in the file (`scaled="auto"`, the default).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def is_fp8_exact(weight):
    """True when every value of `weight` is an fp8 number (a weight read from an fp8 checkpoint)."""
    return bool(torch.equal(weight.to(FP8).to(weight.dtype), weight))


def quantize_tensor(weight, scaled=True):
    """weight [...] -> (fp8 tensor, fp32 scalar scale) with weight ~= fp8 * scale.

    scaled=True maps the largest |value| to the fp8 maximum (448), using its full range;
    scaled=False is a plain cast with scale 1 (VideoX-Fun's storage: values beyond 448 saturate).
    """
    weight = weight.detach().float()
    if scaled:
        scale = (weight.abs().amax() / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    else:
        scale = torch.ones((), device=weight.device)
    return (weight / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_weight(weight, scaled="auto"):
    """`quantize_tensor`, where scaled="auto" means scale 1 for a weight already made of fp8 numbers."""
    if scaled == "auto":
        scaled = not is_fp8_exact(weight)
    return quantize_tensor(weight, scaled)


class FP8Linear(nn.Module):
    """nn.Linear with its weight stored in float8_e4m3fn and a per-tensor scale.

    weight [out, in] fp8 (frozen), scale_weight [] fp32, bias [out] in the original dtype.
    forward: x [..., in] -> [..., out] in the dtype of x, with the weight dequantized to that dtype.
    """

    def __init__(self, in_features, out_features, bias=True, device=None, bias_dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=FP8),
                                   requires_grad=False)
        self.register_buffer("scale_weight", torch.ones((), device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=bias_dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear, scaled="auto"):
        """An FP8Linear holding `linear`'s weight quantized (see `quantize_tensor`); the bias is kept.
        scaled="auto": scale 1 when the weight is already made of fp8 numbers, else a scale."""
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, weight.device,
                    bias_dtype=None if linear.bias is None else linear.bias.dtype)
        if weight.is_meta:  # quantized before the checkpoint is loaded: shapes only
            if linear.bias is not None:
                layer.bias.requires_grad_(linear.bias.requires_grad)
            return layer
        q, scale = quantize_weight(weight, scaled)
        layer.weight.data, layer.scale_weight = q, scale
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=linear.bias.requires_grad)
        return layer

    def dequantized_weight(self, dtype):
        """[out, in] weight in `dtype`."""
        return (self.weight.float() * self.scale_weight).to(dtype)

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def dit_linear_filter(name, module):
    """The default selection: every linear layer of the transformer blocks (attention projections and
    FFN, ~98% of a DiT's weights); embeddings and the head stay in high precision."""
    return name.startswith("blocks.") and isinstance(module, nn.Linear)


def quantize_fp8(model, scaled="auto", select=dit_linear_filter):
    """Replaces, in place, every `nn.Linear` of `model` for which `select(name, module)` holds by an
    `FP8Linear`. Returns the names of the replaced modules. Works on a meta-device model too (then
    load an fp8 state dict with `scale_weight` entries, as saved from a quantized model).
    Apply after `model.to(dtype)` (a dtype cast would upcast the fp8 weights too); `.to(device)` is fine."""
    names = [name for name, module in model.named_modules()
             if type(module) is nn.Linear and select(name, module)]
    if not names:
        raise ValueError(f"quantize_fp8: no nn.Linear of {type(model).__name__} is selected "
                         f"(already quantized, or a LoRA-wrapped model: quantize before adding LoRA)")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FP8Linear.from_linear(getattr(parent, child), scaled))
    return names


def quantize_state_dict(state, names, scaled="auto"):
    """A full state dict's `{name}.weight` for each of `names` (as `quantize_fp8` returns them) stored as
    an `FP8Linear` holds it: the fp8 weight and its `{name}.scale_weight`. Returns a new dict."""
    state = dict(state)
    for name in names:
        state[f"{name}.weight"], state[f"{name}.scale_weight"] = quantize_weight(state[f"{name}.weight"], scaled)
    return state


def fp8_bytes(model):
    """Bytes of the model's parameters and buffers as stored (fp8 weights count one byte each)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
