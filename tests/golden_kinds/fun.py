"""Golden runners of the VideoX-Fun family: `fun_transformer` (Fun InP / Control / Camera DiTs),
`camera_plucker` (pose file -> Plücker rays), `teacache_trace` (TeaCache + cfg skip in the
sampling loop) and `lora_merge` (kohya-format LoRA merge/unmerge)."""

import torch

from golden_kinds import EXT_DIR, assert_close, golden_dir, runner
from wan.camera import plucker_embedding
from wan.checkpoint import load_state_dict
from wan.modules.fun import FunWanModel

golden_dir(EXT_DIR / "fun" / "golden", "fun_transformer", "camera_plucker", "teacache_trace", "lora_merge")

FUN_INPUTS = ("y", "clip_fea", "full_ref", "y_camera")


def build_fun_model(case):
    """A FunWanModel from a case's config; the CLIP branch is there when the case has its weights
    (Wan2.1-Fun) and absent otherwise (Wan2.2-Fun `Wan2_2Transformer3DModel`)."""
    image_branch = any(k.startswith("img_emb.") for k in case.params)
    with torch.device("meta"):
        model = FunWanModel.from_config({**case.config, "image_branch": image_branch})
    return load_state_dict(model, case.params, source=case.path.name).eval()


def contexts(case, prefix="context"):
    keys = sorted((k for k in case.inputs if k.startswith(prefix) and k[len(prefix):].isdigit()),
                  key=lambda k: int(k[len(prefix):]))
    return [case.inputs[k] for k in keys]


@runner("fun_transformer")
def run_fun_transformer(case):
    model = build_fun_model(case)
    kwargs = {k: case.inputs[k] for k in FUN_INPUTS if k in case.inputs}
    with torch.no_grad():
        out = model(case.inputs["x"], case.inputs["t"], contexts(case), **kwargs)
    assert_close(out, case.outputs["out"], atol=1e-4, name=f"{case.path.name} out")


@runner("camera_plucker")
def run_camera_plucker(case):
    meta = case.meta
    out = plucker_embedding(case.inputs["cam_params"], meta["width"], meta["height"],
                            meta.get("original_pose_width", 1280), meta.get("original_pose_height", 720))
    assert_close(out, case.outputs["plucker"], atol=1e-4, name=f"{case.path.name} plucker")
