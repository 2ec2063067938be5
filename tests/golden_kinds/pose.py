"""Golden runners for the UniAnimate-DiT pose cases: `pose_embedding` (the two pose CNNs) and
`pose_dit` (a Wan2.1 i2v DiT with the merged UniAnimate LoRA, pose tokens and reference-pose y)."""

import torch

from golden_kinds import EXT_DIR, assert_close, golden_dir, runner
from wan.checkpoint import load_state_dict
from wan.convert.unianimate import split_unianimate_state
from wan.lora import fuse_lora
from wan.modules.model import WanModel
from wan.modules.pose import PoseEncoder, PoseVideoEmbedding, ReferencePoseEmbedding, features_to_tokens

golden_dir(EXT_DIR / "pose" / "golden", "pose_embedding", "pose_dit")


def submodule_params(params, name):
    """The case's `name.*` tensors without the prefix."""
    return {k[len(name) + 1:]: v for k, v in params.items() if k.startswith(name + ".")}


def hwc_image(image):
    """The reference's uint8-valued [H, W, 3] pose image -> [1, 3, H, W] in [0, 1]."""
    return image.permute(2, 0, 1)[None] / 255


def run_video_embedding(case):
    config = case.config
    with torch.device("meta"):
        cnn = PoseVideoEmbedding(config["out_channels"], hidden=4 * config["concat_dim"])
    load_state_dict(cnn, submodule_params(case.params, "dwpose_embedding"), source=case.path.name)
    pose_video = case.inputs["dwpose_data"][None] / 255
    features = cnn(pose_video)
    assert_close(features, case.outputs["features"], name=f"{case.path.name} features")
    tokens = features_to_tokens(features)
    assert_close(tokens, case.outputs["tokens"], name=f"{case.path.name} tokens")
    # the long-video convention: the CNN re-run per window of latents on pose frames [4 * first, 4 * last]
    block = config["num_frame_per_block"]
    windows = [features_to_tokens(cnn(pose_video[:, :, 4 * start:4 * (start + block - 1) + 1]))
               for start in range(0, config["latent_frames"], block)]
    assert_close(torch.cat(windows, 1), case.outputs["tokens_per_window"], name=f"{case.path.name} per window")


def run_reference_embedding(case):
    config = case.config
    with torch.device("meta"):
        cnn = ReferencePoseEmbedding(config["randomref_dim"], hidden=4 * config["concat_dim"])
    load_state_dict(cnn, submodule_params(case.params, "randomref_embedding_pose"), source=case.path.name)
    features = cnn(hwc_image(case.inputs["random_ref_dwpose"]))
    assert_close(features, case.outputs["features"], name=f"{case.path.name} features")
    assert_close(case.inputs["y"] + features, case.outputs["y_cond"], name=f"{case.path.name} y_cond")


@runner("pose_embedding")
def run_pose_embedding(case):
    with torch.no_grad():
        {"dwpose_embedding": run_video_embedding,
         "randomref_embedding_pose": run_reference_embedding}[case.config["module"]](case)


@runner("pose_dit")
def run_pose_dit(case):
    config = case.config
    pose, lora, base = split_unianimate_state(case.params)
    with torch.device("meta"):
        dit = WanModel.from_config({**config, "model_type": "i2v" if config["has_image_input"] else "t2v"})
        encoder = PoseEncoder(dim=config["dim"], pose_dim=config["pose_proj"][0])
    load_state_dict(dit, base, source=case.path.name).eval()
    fuse_lora(dit, lora)
    for name in ("pose_proj", "randomref_embedding_pose"):
        load_state_dict(getattr(encoder, name), submodule_params(pose, name), source=case.path.name)
    inputs = case.inputs
    with torch.no_grad():
        pose_cond = encoder.pose_proj(inputs["pose_tokens"])
        y_cond = encoder.condition_y(inputs["y"], hwc_image(inputs["random_ref_dwpose"]))
        common = dict(y=y_cond, clip_fea=inputs["clip_feature"])
        cond = dit(inputs["x"], inputs["t"], inputs["context"], add_condition=pose_cond, **common)
        uncond = dit(inputs["x"], inputs["t"], inputs["context_neg"], **common)
    name = case.path.name
    assert_close(pose_cond, case.outputs["pose_cond"], name=f"{name} pose_cond")
    assert_close(y_cond, case.outputs["y_cond"], name=f"{name} y_cond")
    assert_close(cond, case.outputs["pred_cond"], name=f"{name} pred_cond")
    assert_close(uncond, case.outputs["pred_uncond"], name=f"{name} pred_uncond")
    cfg = uncond + config["cfg_scale"] * (cond - uncond)
    assert_close(cfg, case.outputs["pred_cfg"], name=f"{name} pred_cfg")
