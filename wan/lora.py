"""LoRA for the Wan DiT: injection by glob patterns over official module names, exact merge and
unmerge, and the LoRA file format that ComfyUI and diffusers load for Wan.

    names = inject_lora(model, ["blocks.*.self_attn.q", "blocks.*.cross_attn.k_img"], rank=16)
    save_lora(model, "lora.safetensors")       # diffusion_model.<module>.lora_A.weight / .lora_B.weight / .alpha
    save_lora_diffusers(model, "lora.safetensors")   # transformer.<diffusers module>.lora_A/B.weight
    load_lora(model, "lora.safetensors", scale=0.8)   # injects modules shaped as the file and loads it
    merge_lora(model); unmerge_lora(model)     # unmerge restores the original weights bit for bit
    fuse_lora(model, "lora.safetensors", 0.8)  # inference: adds the update into plain weights (stackable)

A LoRA module keeps its base's parameter names (`<module>.weight`, `<module>.bias`), so the model's
state dict stays in the official layout; the adapter adds `<module>.lora_A.weight` [rank, in] and
`<module>.lora_B.weight` [out, rank]. The update is `scale * alpha / rank * B @ A`.
"""

import fnmatch
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import read_state_dict, save_state_dict
from .convert.dit_diffusers import DIT_DIFFUSERS_TABLE
from .lora_formats import merge_into

FILE_PREFIX = "diffusion_model."     # ComfyUI / Wan LoRA files (the official module names)
DIFFUSERS_PREFIX = "transformer."    # LoRAs saved by diffusers (its module names)
INITS = ("kaiming", "gaussian")


@torch.no_grad()
def init_lora_A(weight, init):
    """Initializes a lora_A weight [rank, in]: peft's kaiming-uniform default, or N(0, 1 / rank)."""
    if init == "kaiming":
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    else:
        nn.init.normal_(weight, std=1 / weight.shape[0])


class LoRALinear(nn.Linear):
    """An nn.Linear plus a low-rank update: y = W x + b + scale * alpha / rank * B(A(dropout(x))).

    Made in place from an existing nn.Linear by `add_to`. The adapter runs in its own dtype (fp32
    by default) on top of a base that may be frozen in bf16.
    """

    @classmethod
    def add_to(cls, linear, rank, alpha, dropout=0.0, init="kaiming", dtype=torch.float32):
        if init not in INITS:
            raise ValueError(f"unknown LoRA init '{init}'; expected one of {INITS}")
        linear.__class__ = cls
        device = linear.weight.device
        linear.lora_A = nn.Linear(linear.in_features, rank, bias=False, device=device, dtype=dtype)
        linear.lora_B = nn.Linear(rank, linear.out_features, bias=False, device=device, dtype=dtype)
        linear.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        linear.rank, linear.alpha, linear.lora_scale = rank, float(alpha), 1.0
        linear.original_weight = None  # the unmerged base weight while merged
        init_lora_A(linear.lora_A.weight, init)
        nn.init.zeros_(linear.lora_B.weight)  # so the adapted model starts as the base
        return linear

    @property
    def scaling(self):
        return self.lora_scale * self.alpha / self.rank

    @property
    def merged(self):
        return self.original_weight is not None

    def delta_weight(self):
        """The update scale * alpha / rank * B @ A, [out, in] fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        update = self.lora_B(self.lora_A(self.lora_dropout(x).to(self.lora_A.weight.dtype)))
        return out + (update * self.scaling).to(out.dtype)


def lora_modules(model):
    """{name: LoRALinear} of a model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def match_modules(model, patterns):
    """Names of the nn.Linear modules matching any glob pattern (fnmatch: `*` also crosses dots).

    Raises ValueError naming every pattern that matches no nn.Linear.
    """
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    unmatched = [p for p in patterns if not fnmatch.filter(linears, p)]
    if unmatched or not patterns:
        examples = ", ".join(linears[:3] + [n for n in linears if ".cross_attn." in n][:3])
        raise ValueError(f"LoRA target pattern(s) {unmatched or patterns} match no nn.Linear of "
                         f"{type(model).__name__}; patterns are globs over official module names such as "
                         f"{examples}")
    return [name for name in linears if any(fnmatch.fnmatchcase(name, p) for p in patterns)]


def inject_lora(model, targets, rank, alpha=None, dropout=0.0, init="kaiming", dtype=torch.float32):
    """Adds LoRA to the nn.Linear modules matching `targets` and freezes everything else.

    alpha defaults to rank (scale 1). Returns the adapted module names.
    """
    names = match_modules(model, list(targets))
    model.requires_grad_(False)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            raise ValueError(f"{name} already has a LoRA; fuse it (fuse_lora) before adding another")
        LoRALinear.add_to(module, rank, rank if alpha is None else alpha, dropout, init, dtype)
    return names


def lora_file_state(tensors, alphas):
    """Our LoRA tensors ({<module>.lora_A.weight, ...}) and {module: alpha} -> the file's tensor dict."""
    state = {FILE_PREFIX + key: value for key, value in tensors.items()}
    state.update({f"{FILE_PREFIX}{name}.alpha": torch.tensor(alpha) for name, alpha in alphas.items()})
    return state


def lora_alphas(model):
    return {name: m.alpha for name, m in lora_modules(model).items()}


def save_lora(model, path, tensors=None):
    """Writes the model's LoRA, or `tensors` gathered from it ({<module>.lora_A.weight: ...}), in the
    ComfyUI/diffusers format with the model's alphas."""
    if tensors is None:
        tensors = {name: p for name, p in model.named_parameters() if ".lora_" in name}
    save_state_dict(lora_file_state(tensors, lora_alphas(model)), path, metadata={"format": "pt"})


def diffusers_module(name):
    """An official module name (`blocks.0.cross_attn.k_img`) -> diffusers' (`blocks.0.attn2.add_k_proj`),
    through the DiT key table."""
    return next(iter(DIT_DIFFUSERS_TABLE.to_target({name + ".weight": None})))[:-len(".weight")]


def save_lora_diffusers(model, path, tensors=None):
    """Writes the model's LoRA (or `tensors` gathered from it) as diffusers saves one for Wan:
    `transformer.<diffusers module>.lora_A.weight` / `lora_B.weight`, no alpha (diffusers then takes
    alpha = rank), so alpha / rank is folded into lora_B."""
    if tensors is None:
        tensors = {name: p for name, p in model.named_parameters() if ".lora_" in name}
    alphas = lora_alphas(model)
    state = {}
    for key, value in tensors.items():
        module, _, leaf = key.partition(".lora_")
        if leaf.startswith("B"):
            value = value.float() * (alphas[module] / value.shape[1])
        state[f"{DIFFUSERS_PREFIX}{diffusers_module(module)}.lora_{leaf}"] = value.to(tensors[key].dtype)
    save_state_dict(state, path, metadata={"format": "pt"})


def _official_module(name):
    """A module name of a LoRA file, in any of the known layouts, -> our official module name."""
    if name.startswith(FILE_PREFIX):
        return name[len(FILE_PREFIX):]
    if name.startswith(DIFFUSERS_PREFIX):
        key = DIT_DIFFUSERS_TABLE.to_source({name[len(DIFFUSERS_PREFIX):] + ".weight": None})
        return next(iter(key))[:-len(".weight")]
    return name


def read_lora(source):
    """A LoRA file (or its tensor dict) -> {official module name: (A [r, in], B [out, r], alpha)}.

    Accepts `diffusion_model.` (ComfyUI, ours), `transformer.` (diffusers) and unprefixed names,
    with `lora_A`/`lora_B` or `lora_down`/`lora_up`; a missing alpha means alpha = rank.
    """
    state = read_state_dict(source) if isinstance(source, (str, Path)) else source
    parts = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".lora_") if ".lora_" in key else key.rpartition(".")
        leaf = {"A.weight": "A", "down.weight": "A", "B.weight": "B", "up.weight": "B", "alpha": "alpha"}.get(leaf)
        if leaf is None:
            raise ValueError(f"unexpected key '{key}' in LoRA {source if isinstance(source, (str, Path)) else ''}: "
                             f"expected <module>.lora_A.weight / lora_B.weight / alpha")
        parts.setdefault(_official_module(module), {})[leaf] = value
    lora = {}
    for module, p in parts.items():
        if "A" not in p or "B" not in p:
            raise ValueError(f"LoRA module {module} lacks lora_{'A' if 'A' not in p else 'B'}.weight")
        rank = p["A"].shape[0]
        lora[module] = (p["A"], p["B"], float(p["alpha"]) if "alpha" in p else float(rank))
    return lora


def load_lora(model, source, scale=1.0, dropout=0.0, dtype=torch.float32):
    """Injects LoRA modules shaped as `source` (file or tensor dict) and loads its weights.

    Returns the adapted module names; the rest of the model is frozen, as by `inject_lora`.
    """
    lora = read_lora(source)
    model.requires_grad_(False)
    for name, (a, b, alpha) in lora.items():
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear) or isinstance(module, LoRALinear):
            raise ValueError(f"cannot load LoRA into {name}: it is {type(module).__name__}, not a plain nn.Linear")
        LoRALinear.add_to(module, a.shape[0], alpha, dropout, dtype=dtype)
        with torch.no_grad():
            module.lora_A.weight.copy_(a)
            module.lora_B.weight.copy_(b)
        module.lora_scale = scale
    return list(lora)


def set_lora_scale(model, scale):
    for module in lora_modules(model).values():
        if module.merged:
            raise RuntimeError("unmerge the LoRA before changing its scale")
        module.lora_scale = scale


@torch.no_grad()
def merge_lora(model):
    """Adds each LoRA update into its base weight; the original weight is kept for an exact unmerge."""
    for module in lora_modules(model).values():
        if not module.merged:
            module.original_weight = module.weight.detach().clone()
            module.weight.copy_(module.weight.float() + module.delta_weight())


@torch.no_grad()
def unmerge_lora(model):
    """Restores the weights `merge_lora` changed, bit for bit."""
    for module in lora_modules(model).values():
        if module.merged:
            module.weight.copy_(module.original_weight)
            module.original_weight = None


def fuse_lora(model, source, scale=1.0):
    """Adds a LoRA file's update scale * alpha / rank * B @ A into the weights of the model's plain
    modules, with no modules added (inference; several LoRAs stack). Any format of
    `wan.lora_formats` (ComfyUI, kohya, PEFT, diffusers). Returns the module names."""
    return merge_into(model, source, scale)


def count_parameters(model):
    """(trainable, total) parameter counts; works on the meta device."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _human(n):
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def parameter_report(model):
    """'trainable 13.1M of 16.4B parameters (0.08%)'."""
    trainable, total = count_parameters(model)
    return f"trainable {_human(trainable)} of {_human(total)} parameters ({100 * trainable / total:.2f}%)"
