"""Wan VAE checkpoints: loading (`load_vae`), and the diffusers `AutoencoderKLWan` layout.

Our parameter names are the official ones. diffusers renames the modules, names the parts of a
residual block, and groups each decoder level's blocks (Wan2.1 keeps them in one flat list): the key
table below spells that out row by row, `{}` standing for an index or a parameter name.
"""

import inspect
import re

from wan.checkpoint import load_model
from wan.convert.keymap import KeyTable
from wan.modules.vae2_1 import WanVAE21
from wan.modules.vae2_2 import PATCH_SIZE, WanVAE22

VAE_CLASSES = {"2.1": WanVAE21, "2.2": WanVAE22}

# Parameters of each block kind: (ours, diffusers), relative to the block.
_RESIDUAL = [("residual.0.gamma", "norm1.gamma"), ("residual.2.{}", "conv1.{}"), ("residual.3.gamma", "norm2.gamma"),
             ("residual.6.{}", "conv2.{}"), ("shortcut.{}", "conv_shortcut.{}")]
_ATTENTION = [("norm.gamma", "norm.gamma"), ("to_qkv.{}", "to_qkv.{}"), ("proj.{}", "proj.{}")]
_RESAMPLE = [("resample.1.{}", "resample.1.{}"), ("time_conv.{}", "time_conv.{}")]


def _block(ours, theirs, parts):
    return [(f"{ours}.{a}", f"{theirs}.{b}") for a, b in parts]


def vae_key_table(version, num_res_blocks=2, levels=4):
    """KeyTable official -> diffusers for a VAE of `version` with this many residual blocks per encoder
    level (the decoder has one more) and resolution levels (len(dim_mult))."""
    rows = [("conv1.{}", "quant_conv.{}"), ("conv2.{}", "post_quant_conv.{}")]
    for c in ("encoder", "decoder"):
        rows += [(f"{c}.conv1.{{}}", f"{c}.conv_in.{{}}"), (f"{c}.head.0.gamma", f"{c}.norm_out.gamma"),
                 (f"{c}.head.2.{{}}", f"{c}.conv_out.{{}}")]
        rows += (_block(f"{c}.middle.0", f"{c}.mid_block.resnets.0", _RESIDUAL)
                 + _block(f"{c}.middle.1", f"{c}.mid_block.attentions.0", _ATTENTION)
                 + _block(f"{c}.middle.2", f"{c}.mid_block.resnets.1", _RESIDUAL))
    if version == "2.1":
        rows += _block("encoder.downsamples.{}", "encoder.down_blocks.{}", _RESIDUAL + _ATTENTION + _RESAMPLE)
        # Our decoder list is flat: each level's residual blocks, then its upsampler (none after the last).
        per_level = num_res_blocks + 2
        for n in range(levels * per_level - 1):
            i, k = divmod(n, per_level)
            rows += (_block(f"decoder.upsamples.{n}", f"decoder.up_blocks.{i}.resnets.{k}", _RESIDUAL)
                     if k < per_level - 1 else
                     _block(f"decoder.upsamples.{n}", f"decoder.up_blocks.{i}.upsamplers.0", _RESAMPLE))
    elif version == "2.2":
        for ours, theirs, blocks, resampler in (("encoder.downsamples", "encoder.down_blocks", num_res_blocks,
                                                 "downsampler"),
                                                ("decoder.upsamples", "decoder.up_blocks", num_res_blocks + 1,
                                                 "upsampler")):
            stage = ours.split(".")[1]
            rows += _block(f"{ours}.{{}}.{stage}.{{}}", f"{theirs}.{{}}.resnets.{{}}", _RESIDUAL)
            rows += _block(f"{ours}.{{}}.{stage}.{blocks}", f"{theirs}.{{}}.{resampler}", _RESAMPLE)
    else:
        raise ValueError(f"unknown VAE version '{version}'; expected one of {sorted(VAE_CLASSES)}")
    return KeyTable(rows, name=f"Wan{version} VAE <-> diffusers AutoencoderKLWan")


def _indices(keys, pattern):
    regex = re.compile(pattern)
    return {int(m.group(1)) for m in map(regex.match, keys) if m}


def _layout(keys):
    """(version, num_res_blocks, levels) of a VAE state dict in either layout, read off its keys."""
    keys = list(keys)
    if is_diffusers_vae(keys):
        version = "2.2" if any(k.startswith("encoder.down_blocks.0.resnets.") for k in keys) else "2.1"
        res = _indices(keys, r"decoder\.up_blocks\.0\.resnets\.(\d+)\.")
        return version, len(res) - 1, len(_indices(keys, r"decoder\.up_blocks\.(\d+)\."))
    if any(k.startswith("encoder.downsamples.0.downsamples.") for k in keys):
        res = _indices(keys, r"decoder\.upsamples\.0\.upsamples\.(\d+)\.residual\.")
        return "2.2", len(res) - 1, len(_indices(keys, r"decoder\.upsamples\.(\d+)\."))
    upsamplers = _indices(keys, r"decoder\.upsamples\.(\d+)\.resample\.")
    return "2.1", min(upsamplers, default=1) - 1, len(upsamplers) + 1


def is_diffusers_vae(keys):
    return "quant_conv.weight" in keys


def vae_to_diffusers(state_dict):
    """Official (our) VAE state dict -> diffusers `AutoencoderKLWan` state dict (same tensors)."""
    return vae_key_table(*_layout(state_dict)).to_target(state_dict)


def vae_from_diffusers(state_dict):
    """diffusers `AutoencoderKLWan` state dict -> official (our) key layout."""
    return vae_key_table(*_layout(state_dict)).to_source(state_dict)


def diffusers_config(version="2.1", **config):
    """`AutoencoderKLWan` config for our VAE built with `config` (official names; defaults = ours)."""
    defaults = {name: p.default for name, p in inspect.signature(VAE_CLASSES[version]).parameters.items()}
    unknown = config.keys() - defaults.keys()
    if unknown:
        raise ValueError(f"unknown Wan{version} VAE argument(s) {sorted(unknown)}; expected {sorted(defaults)}")
    cfg = {**defaults, **config}
    out = dict(base_dim=cfg["dim"], z_dim=cfg["z_dim"], num_res_blocks=cfg["num_res_blocks"],
               dropout=cfg["dropout"], **{k: list(cfg[k]) for k in ("dim_mult", "attn_scales", "temperal_downsample",
                                                                    "latents_mean", "latents_std")})
    if version == "2.2":
        channels = 3 * PATCH_SIZE**2
        out.update(decoder_base_dim=cfg["dec_dim"], is_residual=True, in_channels=channels, out_channels=channels,
                   patch_size=PATCH_SIZE, scale_factor_spatial=PATCH_SIZE * 2 ** (len(cfg["dim_mult"]) - 1))
    return out


def config_from_diffusers(config):
    """`AutoencoderKLWan` config (e.g. a diffusers folder's vae/config.json) -> (version, our arguments)."""
    version = "2.2" if config.get("is_residual") else "2.1"
    ours = dict(dim=config.get("base_dim", 96), z_dim=config.get("z_dim", 16))
    ours.update({k: config[k] for k in ("dim_mult", "num_res_blocks", "attn_scales", "temperal_downsample",
                                        "dropout", "latents_mean", "latents_std") if k in config})
    if version == "2.2":
        ours["dec_dim"] = config.get("decoder_base_dim") or ours["dim"]
    return version, ours


def load_vae(path, version="2.1", dtype=None, device="cpu", **config):
    """Builds the Wan`version` VAE (`config` overrides the released model's arguments) and loads
    `path`: the official `Wan2.1_VAE.pth` / `Wan2.2_VAE.pth`, or a diffusers-layout weight file.
    Returns the model in eval mode without gradients."""
    if version not in VAE_CLASSES:
        raise ValueError(f"unknown VAE version '{version}'; expected one of {sorted(VAE_CLASSES)}")

    def official_layout(state):
        return vae_from_diffusers(state) if is_diffusers_vae(state) else state

    model = load_model(lambda: VAE_CLASSES[version](**config), path, dtype, device, convert=official_layout)
    return model.eval().requires_grad_(False)
