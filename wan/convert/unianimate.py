"""UniAnimate-DiT weights: the released `UniAnimate-Wan2.1-14B-Lora-12000.ckpt` and pose CNN files.

The release is a flat dict of the training module's trainable tensors: the two pose CNNs under their
own names (`dwpose_embedding.N.*`, `randomref_embedding_pose.N.*`) and a peft LoRA of the base
Wan2.1-I2V-14B DiT under `pipe.dit.blocks.N.<module>.lora_{A,B}.default.weight` (self_attn and
cross_attn q/k/v/o, ffn.0, ffn.2; no alpha stored). The reference merges the LoRA into the base as
W += B @ A (multiplier 1.0, peft's alpha / rank not applied; the release has alpha = rank), which
is `wan.lora.fuse_lora` of a file without alphas at scale 1.

Pose CNN weights saved elsewhere (another trainer's module prefix, our exports) are found by name
wherever they sit in a key, as the reference loads them: everything before the module name is cut.
"""

import logging
from pathlib import Path

from ..checkpoint import CheckpointError, load_state_dict, read_state_dict
from ..lora import fuse_lora, read_lora
from .keymap import KeyTable

log = logging.getLogger(__name__)

POSE_MODULES = ("dwpose_embedding", "randomref_embedding_pose", "pose_proj")

# ours (PoseEncoder and wan.lora names) -> the released checkpoint's
UNIANIMATE_TABLE = KeyTable([
    ("dwpose_embedding.{}.{}", "dwpose_embedding.{}.{}"),
    ("randomref_embedding_pose.{}.{}", "randomref_embedding_pose.{}.{}"),
    ("pose_proj.{}", "pose_proj.{}"),
    ("blocks.{}.{}.{}.lora_{}.weight", "pipe.dit.blocks.{}.{}.{}.lora_{}.default.weight"),
], name="UniAnimate checkpoint")


def pose_module_name(key):
    """The key from its pose module's name on (`x.y.dwpose_embedding.0.weight` -> `dwpose_embedding.0.weight`),
    or None for a key of no pose module."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part in POSE_MODULES:
            return ".".join(parts[i:])
    return None


def split_unianimate_state(state):
    """A checkpoint's tensors -> (pose modules {PoseEncoder key: tensor}, LoRA {module.lora_A/B.weight
    (+ .alpha): tensor} in `wan.lora` names, the other tensors as they are)."""
    pose, lora, rest = {}, {}, {}
    for key, value in state.items():
        name = pose_module_name(key)
        if name is not None:
            pose[name] = value
        elif ".lora_" in key or key.endswith(".alpha"):
            lora[key] = value
        else:
            rest[key] = value
    if lora and UNIANIMATE_TABLE.matches_target(lora):
        lora = UNIANIMATE_TABLE.to_source(lora)
    return pose, lora, rest


def _source_name(source):
    return str(source) if isinstance(source, (str, Path)) else "state dict"


def read_unianimate(sources):
    """Reads pose weight files (or tensor dicts) -> (pose state, LoRA state) merged over all of them;
    any other tensor is an error naming it."""
    pose, lora = {}, {}
    for source in sources:
        state = read_state_dict(source) if isinstance(source, (str, Path)) else source
        file_pose, file_lora, rest = split_unianimate_state(state)
        if rest:
            raise CheckpointError(f"{_source_name(source)}: {len(rest)} tensor(s) are neither pose modules "
                                  f"{POSE_MODULES} nor LoRA weights: {sorted(rest)[:6]}")
        log.info("%s: %d pose module tensors, %d LoRA tensors", _source_name(source), len(file_pose), len(file_lora))
        pose.update(file_pose)
        lora.update(file_lora)
    return pose, lora


def load_pose_encoder(encoder, pose_state, source="pose weights"):
    """Loads the pose CNNs (and pose_proj) strictly; a narrower DiT's `pose_proj` is not in the release."""
    expected = encoder.state_dict()
    if any(k.startswith("pose_proj.") for k in expected) and not any(k.startswith("pose_proj.") for k in pose_state):
        raise CheckpointError(f"{source} has no pose_proj for a DiT of width {encoder.pose_proj.out_features}: the "
                              f"released UniAnimate weights are for the 14B (width 5120); train pose_proj "
                              f"(trainer `pose`) and pass its weights as well")
    unused = [k for k in pose_state if k not in expected and k.startswith("randomref_embedding_pose.")]
    if unused:
        log.info("%s: randomref_embedding_pose unused, the DiT takes no `y`", source)
    state = {k: v for k, v in pose_state.items() if k not in unused}
    return load_state_dict(encoder, state, source=source)


def load_unianimate(dit, encoder, sources, lora_scale=1.0):
    """Loads UniAnimate-DiT weights (the release and/or separate pose module and LoRA files) into a
    `PoseEncoder` and merges their LoRA into `dit` as the reference does. Returns the merged module names."""
    pose, lora = read_unianimate(sources)
    load_pose_encoder(encoder, pose, source=", ".join(_source_name(s) for s in sources))
    if not lora:
        return []
    names = fuse_lora(dit, lora, lora_scale)
    rank = next(v.shape[0] for k, v in lora.items() if k.endswith("lora_A.weight"))
    log.info("merged the UniAnimate LoRA (rank %d, scale %s) into %d DiT modules", rank, lora_scale, len(names))
    return names


# The modules UniAnimate-DiT trains a LoRA on (peft target_modules q, k, v, o, ffn.0, ffn.2): not the
# CLIP branch's k_img / v_img.
UNIANIMATE_LORA_TARGETS = ("blocks.*.self_attn.[qkvo]", "blocks.*.cross_attn.[qkvo]", "blocks.*.ffn.[02]")


def unianimate_state(encoder, dit=None):
    """A `PoseEncoder`'s weights and the LoRA of `dit` (injected with `wan.lora.inject_lora`) in the
    released checkpoint's layout."""
    state = dict(encoder.state_dict())
    if dit is not None:
        state.update({k: v for k, v in dit.state_dict().items() if ".lora_" in k})
    return UNIANIMATE_TABLE.to_target(state)


def merge_lora_state(state, lora, prefix=""):
    """Adds a LoRA (tensor dict in `wan.lora` names) into the base weights of a state dict, as
    `fuse_lora` does into a model: W += alpha / rank * B @ A (1 x B @ A for the release)."""
    for module, (a, b, alpha) in read_lora(lora).items():
        key = f"{prefix}{module}.weight"
        if key not in state:
            raise CheckpointError(f"LoRA module {module} has no base weight {key} in the DiT")
        state[key] = (state[key].float() + (b.float() @ a.float()) * (alpha / a.shape[0])).to(state[key].dtype)
    return state
