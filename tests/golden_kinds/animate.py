"""Golden runner for Wan2.2-Animate (kind `animate`): WanAnimateModel forward, face path included.
The cases narrow the hard-coded face-path widths; the model is built from `meta.face_path_override`."""

import torch

from golden_kinds import EXT_DIR, assert_close, golden_dir, runner
from wan.checkpoint import load_state_dict
from wan.modules.animate import WanAnimateModel

golden_dir(EXT_DIR / "variants" / "golden", "animate")


def face_path_config(override):
    """The case's `face_path_override` as WanAnimateModel arguments."""
    return dict(face_size=override["face_size"], face_channels=override["encoder_app_channels"],
                style_dim=override["style_dim"], face_encoder_width=override["face_encoder_width"])


@runner("animate")
def run_animate(case):
    override = case.meta.get("face_path_override")
    config = {**case.config, **(face_path_config(override) if override else {})}
    with torch.device("meta"):
        model = WanAnimateModel.from_config(config)
    load_state_dict(model, case.params, source=case.path.name)
    model.eval()
    inputs = case.inputs
    num_samples = len([k for k in inputs if k.startswith("x")])
    with torch.no_grad():
        for i in range(num_samples):
            out = model(inputs[f"x{i}"][None], inputs["t"][i:i + 1], inputs[f"context{i}"][None],
                        y=inputs[f"y{i}"][None], clip_fea=inputs["clip_fea"][i:i + 1],
                        pose_latents=inputs["pose_latents"][i:i + 1],
                        face_pixel_values=inputs["face_pixel_values"][i:i + 1])
            assert_close(out[0], case.outputs[f"out{i}"], atol=1e-4, name=f"{case.path.name} out{i}")
