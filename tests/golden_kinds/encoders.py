"""Golden runners for the umT5 text encoder and the CLIP image tower."""

import torch

from golden_kinds import assert_close, runner
from wan.checkpoint import load_state_dict
from wan.modules.clip import CLIPImageEncoder, VisionTransformer, visual_state_dict
from wan.modules.t5 import T5Encoder


def build(cls, case, params):
    """The model of `case.config`, built on meta and loaded the way users load checkpoints."""
    with torch.device("meta"):
        model = cls(**case.config)
    return load_state_dict(model, params, source=case.path.name).eval()


@runner("t5_encoder")
def run_t5_encoder(case):
    model = build(T5Encoder, case, case.params)
    with torch.no_grad():
        hidden = model(case.inputs["ids"], case.inputs["mask"])
    assert_close(hidden, case.outputs["hidden"], name=f"{case.path.name} hidden")


@runner("clip_visual")
def run_clip_visual(case):
    # The case may store the tower's keys with or without the full model's `visual.` prefix.
    model = build(VisionTransformer, case, visual_state_dict(case.params))
    images = case.inputs["images"]  # [B, 3, H, W], or [B, 3, F, H, W]: the official list of clips, stacked
    features = CLIPImageEncoder(model).encode(images if images.ndim == 4 else list(images))
    assert_close(features, case.outputs["features"], name=f"{case.path.name} features")
