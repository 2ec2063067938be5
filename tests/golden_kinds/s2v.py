"""Golden runner for kind `s2v`: Wan2.2 S2V DiT forward of one clip (and the audio features that feed
it) against the official `WanModel_S2V`."""

import torch

from golden_kinds import EXT_DIR, assert_close, golden_dir, runner
from pipelines.s2v_features import features_per_frame, to_feature_rate
from wan.checkpoint import load_state_dict
from wan.modules.s2v import WanS2VModel

golden_dir(EXT_DIR / "variants" / "golden", "s2v")


def check_audio_window(case):
    """The clip's audio input equals our features of the stored 50 Hz hidden states, window `clip_index`."""
    frames, clip = case.meta["infer_frames"], case.meta["clip_index"]
    features = features_per_frame(to_feature_rate(case.inputs["audio_hidden_50hz"]), frames * (clip + 1),
                                  case.meta["fps"])
    window = features[..., clip * frames:(clip + 1) * frames][None]
    assert_close(window, case.inputs["audio_input"], atol=1e-5, name=f"{case.path.name} audio_input")


@runner("s2v")
def run_s2v(case):
    if "audio_hidden_50hz" in case.inputs:
        check_audio_window(case)
    with torch.device("meta"):
        model = WanS2VModel.from_config(case.config)
    model = load_state_dict(model, case.params, source=case.path.name).eval()
    inputs = case.inputs
    with torch.no_grad():
        out = model(inputs["x0"][None], inputs["t"], inputs["context0"][None], ref_latents=inputs["ref_latents"],
                    audio=inputs["audio_input"], motion_latents=inputs["motion_latents"], cond=inputs["cond_states"],
                    drop_motion=case.meta["drop_motion_frames"])
    assert_close(out[0], case.outputs["out0"], atol=1e-4, name=f"{case.path.name} out0")
