"""Architectures of the VideoX-Fun Wan checkpoints (`FunWanModel` constructor arguments), by the name
of their key manifest in the reference data. The Wan2.1-Fun models are i2v-style (CLIP branch); the
Wan2.2-Fun experts have no CLIP branch; 5B InP is the TI2V-5B DiT with 48 + 4 + 48 input channels."""

from . import get_preset

_WAN21_1_3B = dict(model_type="i2v", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
_WAN21_14B = dict(get_preset("i2v-14B").dit)
_WAN22_A14B = dict(get_preset("i2v-A14B").dit)
_CAMERA = dict(add_control_adapter=True, in_dim_control_adapter=24, downscale_factor_control_adapter=8)

FUN_MODELS = {
    "wan2.1_fun_1.3B_inp": dict(_WAN21_1_3B, in_dim=36),
    "wan2.1_fun_14B_inp": dict(_WAN21_14B, in_dim=36),
    "wan2.1_fun_1.3B_control": dict(_WAN21_1_3B, in_dim=48),
    "wan2.1_fun_14B_control": dict(_WAN21_14B, in_dim=48),
    "wan2.1_fun_v1.1_1.3B_control": dict(_WAN21_1_3B, in_dim=48, add_ref_conv=True),
    "wan2.1_fun_v1.1_14B_control": dict(_WAN21_14B, in_dim=48, add_ref_conv=True),
    "wan2.1_fun_v1.1_1.3B_control_camera": dict(_WAN21_1_3B, in_dim=32, **_CAMERA),
    "wan2.1_fun_v1.1_14B_control_camera": dict(_WAN21_14B, in_dim=32, **_CAMERA),
    "wan2.2_fun_A14B_inp_expert": dict(_WAN22_A14B, in_dim=36),
    "wan2.2_fun_A14B_control_expert": dict(_WAN22_A14B, in_dim=52, add_ref_conv=True),
    "wan2.2_fun_A14B_control_camera_expert": dict(_WAN22_A14B, in_dim=36, **_CAMERA),
    "wan2.2_fun_5B_inp": dict(get_preset("ti2v-5B").dit, in_dim=100),
}
