"""Registry of named presets, one per official Wan model (the official `WAN_CONFIGS`)."""

from .preset import NEGATIVE_PROMPT, WanPreset

SIZE_CONFIGS = {s: tuple(int(v) for v in s.split("*")) for s in (
    "720*1280", "1280*720", "480*832", "832*480", "704*1280", "1280*704", "1024*704", "704*1024")}

_SIZES_1_3B = ("480*832", "832*480")
_SIZES_14B = ("720*1280", "1280*720", "480*832", "832*480")

_DIT_1_3B = dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
_DIT_14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)

PRESETS = {}


def register_preset(preset):
    if preset.name in PRESETS:
        raise ValueError(f"preset '{preset.name}' is already registered")
    PRESETS[preset.name] = preset
    return preset


def get_preset(name):
    if name not in PRESETS:
        raise KeyError(f"unknown preset '{name}'; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


for _preset in (
    WanPreset("t2v-1.3B", "wan2.1", "t2v", dict(model_type="t2v", in_dim=16, **_DIT_1_3B),
              "wan2.1_t2v_1.3B", _SIZES_1_3B),
    WanPreset("t2v-14B", "wan2.1", "t2v", dict(model_type="t2v", in_dim=16, **_DIT_14B),
              "wan2.1_t2v_14B", _SIZES_14B),
    WanPreset("i2v-14B", "wan2.1", "i2v", dict(model_type="i2v", in_dim=36, **_DIT_14B),
              "wan2.1_i2v_14B", _SIZES_14B, use_clip=True, sample_steps=40),
    WanPreset("flf2v-14B", "wan2.1", "flf2v", dict(model_type="flf2v", in_dim=36, **_DIT_14B),
              "wan2.1_flf2v_14B", _SIZES_14B, use_clip=True, sample_shift=16.0),
    WanPreset("t2v-A14B", "wan2.2", "t2v", dict(model_type="t2v", in_dim=16, **_DIT_14B),
              "wan2.2_t2v_A14B_expert", _SIZES_14B, moe_boundary=0.875, sample_steps=40,
              sample_shift=12.0, guide_scale=(3.0, 4.0)),
    WanPreset("i2v-A14B", "wan2.2", "i2v", dict(model_type="i2v", in_dim=36, image_branch=False, **_DIT_14B),
              "wan2.2_i2v_A14B_expert", _SIZES_14B, moe_boundary=0.900, sample_steps=40,
              sample_shift=5.0, guide_scale=(3.5, 3.5)),
    WanPreset("ti2v-5B", "wan2.2", "ti2v",
              dict(model_type="ti2v", in_dim=48, out_dim=48, dim=3072, ffn_dim=14336, num_heads=24, num_layers=30),
              "wan2.2_ti2v_5B", ("704*1280", "1280*704"), vae="wan2.2", frame_num=121, fps=24),
):
    register_preset(_preset)

__all__ = ["NEGATIVE_PROMPT", "PRESETS", "SIZE_CONFIGS", "WanPreset", "get_preset", "register_preset"]
