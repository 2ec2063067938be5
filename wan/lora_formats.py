"""LoRA files in the layouts the Wan community trains, read onto the official module names, and
merged into (and exactly unmerged from) a model's weights.

| format | module name | tensors |
|---|---|---|
| ComfyUI / musubi / ours | `diffusion_model.blocks.0.self_attn.q` | `.lora_A.weight` `.lora_B.weight` `.alpha` |
| kohya (VideoX-Fun, musubi) | `lora_unet_blocks_0_self_attn_q` (VideoX-Fun: `lora_unet__`) | `.lora_down/.lora_up.weight` `.alpha` |
| PEFT | `base_model.model.blocks.0.self_attn.q` or bare | `.lora_A[.default].weight` `.lora_B[.default].weight` |
| diffusers | `transformer.blocks.0.attn1.to_q` (or bare) | `.lora_A.weight` `.lora_B.weight` (`.alpha`) |

Kohya names lose the dots, so they are resolved against the model's own module names; diffusers
names go through the DiT key table (`wan.convert.dit_diffusers`). The update of a module is
`scale * alpha / rank * up @ down` (alpha = rank when the file has none; 1x1 convolutions squeezed).
Text-encoder entries (`lora_te*`, `text_encoder.`) are skipped with a warning: only the DiT is adapted.

    merged = merge_lora_files(model, [("style.safetensors", 0.8), ("detail.safetensors", 0.5)])
    merged.unmerge()        # the original weights back, bit for bit

Merging refuses fp8 weights: merge first, then quantize (merging into e4m3 re-rounds every weight
and an unmerge cannot undo it, VideoX-Fun's order).
"""

import logging
import re
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import read_state_dict
from .convert.dit_diffusers import DIT_DIFFUSERS_TABLE

log = logging.getLogger(__name__)

# (key pattern, leaf): module name in group 1.
_LEAVES = [
    (re.compile(r"^(.+)\.lora_(?:A|down)(?:\.default)?\.weight$"), "A"),
    (re.compile(r"^(.+)\.lora_(?:B|up)(?:\.default)?\.weight$"), "B"),
    (re.compile(r"^(.+)\.alpha$"), "alpha"),
]
_PREFIXES = ("diffusion_model.", "base_model.model.", "model.")
_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder.", "text_encoders.")
_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
             if hasattr(torch, n))


def lora_format(keys):
    """'kohya', 'diffusers', 'peft' or 'comfyui' for the keys of a LoRA file."""
    keys = list(keys)
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if any(k.startswith("transformer.") for k in keys):
        return "diffusers"
    if any(k.startswith("base_model.model.") or ".default." in k for k in keys):
        return "peft"
    return "comfyui"


def _adaptable_modules(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d))}


def _split(key):
    for pattern, leaf in _LEAVES:
        match = pattern.match(key)
        if match:
            return match.group(1), leaf
    return None, None


def _diffusers_module(name):
    try:
        converted = DIT_DIFFUSERS_TABLE.to_source({name + ".weight": None})
    except KeyError:
        return None
    return next(iter(converted))[:-len(".weight")]


def official_module_name(name, modules):
    """A LoRA file's module name (any format above) -> the model's module name, or None."""
    if name.startswith("lora_unet_"):
        flat = {n.replace(".", "_"): n for n in modules}
        return flat.get(name[len("lora_unet_"):].lstrip("_"))
    if name.startswith("transformer."):
        name = name[len("transformer."):]
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    if name in modules:
        return name
    return _diffusers_module(name)


def read_lora_for(model, source):
    """A LoRA file (or its tensor dict) in any supported format -> {module name of `model`:
    (down [r, in], up [out, r], alpha)}. Raises naming the entries that fit no module of the model."""
    state = read_state_dict(source) if isinstance(source, (str, Path)) else source
    label = source if isinstance(source, (str, Path)) else "LoRA state dict"
    modules = _adaptable_modules(model)
    parts, skipped_te, unknown = {}, 0, []
    for key, value in state.items():
        if key.startswith(_TEXT_ENCODER_PREFIXES):
            skipped_te += 1
            continue
        name, leaf = _split(key)
        if name is None:
            unknown.append(key)
            continue
        module = official_module_name(name, modules)
        if module is None:
            unknown.append(key)
            continue
        parts.setdefault(module, {})[leaf] = value
    if skipped_te:
        log.warning("%s: skipped %d text-encoder LoRA tensors (only the DiT is adapted)", label, skipped_te)
    if unknown:
        raise ValueError(f"{label} ({lora_format(state)} format): {len(unknown)} entr(y/ies) match no module of "
                         f"{type(model).__name__}: {', '.join(sorted(unknown)[:6])}; expected kohya "
                         f"(lora_unet_<module>), ComfyUI (diffusion_model.<module>), PEFT or diffusers names")
    lora = {}
    for module, p in parts.items():
        if "A" not in p or "B" not in p:
            raise ValueError(f"{label}: LoRA module {module} lacks its {'down/A' if 'A' not in p else 'up/B'} weight")
        down, up = p["A"].flatten(1), p["B"].flatten(1)
        weight = modules[module].weight
        if up.shape[0] != weight.shape[0] or down.shape[1] != weight[0].numel() or down.shape[0] != up.shape[1]:
            raise ValueError(f"{label}: LoRA of {module} has down {tuple(down.shape)} / up {tuple(up.shape)}, which "
                             f"does not fit its weight {tuple(weight.shape)} (a LoRA of another model size?)")
        lora[module] = (down, up, float(p["alpha"]) if "alpha" in p else float(down.shape[0]))
    return lora


def lora_delta(down, up, alpha, scale, shape):
    """scale * alpha / rank * up @ down, fp32, reshaped to the weight's shape."""
    return ((up.float() @ down.float()) * (scale * alpha / down.shape[0])).reshape(shape)


@torch.no_grad()
def merge_into(model, source, scale=1.0, originals=None):
    """Adds a LoRA file's updates into the model's weights; returns the module names it changed.
    originals: a dict that receives a CPU copy of each weight before its first change (for unmerging)."""
    lora = read_lora_for(model, source)
    for name, (down, up, alpha) in lora.items():
        weight = model.get_submodule(name).weight
        if weight.dtype in _FP8:
            raise ValueError(f"{name} is stored in {weight.dtype}: merge LoRAs before fp8 quantization "
                             f"(a merge into fp8 weights is re-rounded and cannot be undone)")
        if originals is not None:
            originals.setdefault(name, weight.detach().to("cpu", copy=True))
        weight.copy_(weight.float() + lora_delta(down, up, alpha, scale, weight.shape).to(weight.device))
    return list(lora)


class MergedLoRA:
    """LoRA updates added into a model's weights, with the original weights kept for an exact unmerge."""

    def __init__(self, model):
        self.model = model
        self.originals = {}  # module name -> original weight (CPU copy)

    def add(self, source, scale=1.0):
        """Merges one LoRA file at `scale`; returns the module names it changed."""
        return merge_into(self.model, source, scale, self.originals)

    @torch.no_grad()
    def unmerge(self):
        """Restores every weight changed since this object was made, bit for bit."""
        for name, original in self.originals.items():
            self.model.get_submodule(name).weight.copy_(original)
        self.originals = {}


def merge_lora_files(model, loras):
    """Merges [(file or tensor dict, scale), ...] in order; returns the `MergedLoRA` that unmerges them."""
    merged = MergedLoRA(model)
    for source, scale in loras:
        merged.add(source, scale)
    return merged
