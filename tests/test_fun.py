"""VideoX-Fun variant models: checkpoint layouts, composition with WanModel, camera inputs."""

import json

import pytest
import torch

from conftest import state_shapes
from golden_kinds import EXT_DIR
from wan.camera import camera_condition, plucker_embedding, pose_file_condition, read_pose_file
from wan.configs.fun import FUN_MODELS
from wan.modules.fun import FunWanModel
from wan.modules.model import WanModel

pytestmark = pytest.mark.usefixtures("single_thread")

MANIFESTS = sorted((EXT_DIR / "fun" / "manifests").glob("*.json"))
TINY = dict(model_type="i2v", dim=32, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=32, text_dim=32, text_len=16,
            clip_dim=32, clip_tokens=5)


def test_every_fun_manifest_has_a_config():
    assert MANIFESTS and sorted(p.stem for p in MANIFESTS) == sorted(FUN_MODELS)


@pytest.mark.parametrize("name", sorted(FUN_MODELS))
def test_fun_state_dict_matches_manifest(name):
    with torch.device("meta"):
        model = FunWanModel(**FUN_MODELS[name])
    manifest = json.loads((EXT_DIR / "fun" / "manifests" / f"{name}.json").read_text())
    assert state_shapes(model.state_dict()) == manifest["keys"]
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]


def _inputs(in_dim, grid=(2, 4, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, *grid, generator=g)
    y = torch.randn(1, in_dim - 16, *grid, generator=g)
    context = [torch.randn(7, 32, generator=g)]
    clip = torch.randn(1, 5, 32, generator=g)
    return x, torch.tensor([700.0]), context, y, clip


def test_fun_inp_is_the_official_i2v_model():
    torch.manual_seed(0)
    fun = FunWanModel(in_dim=36, **TINY).eval()
    official = WanModel(in_dim=36, **TINY).eval()
    official.load_state_dict(fun.state_dict())
    x, t, context, y, clip = _inputs(36)
    with torch.no_grad():
        assert torch.equal(fun(x, t, context, y=y, clip_fea=clip), official(x, t, context, y=y, clip_fea=clip))


def test_fun_reference_tokens_condition_the_video_and_are_dropped():
    torch.manual_seed(0)
    model = FunWanModel(in_dim=48, add_ref_conv=True, **TINY).eval()
    x, t, context, y, clip = _inputs(48)
    ref = torch.randn(1, 16, 4, 6)
    with torch.no_grad():
        out = model(x, t, context, y=y, clip_fea=clip, full_ref=ref)
        other = model(x, t, context, y=y, clip_fea=clip, full_ref=ref * 2)
        # per-token timesteps: reference tokens take the last token's t, same as a scalar t
        per_token = model(x, t[:, None].expand(1, 12), context, y=y, clip_fea=clip, full_ref=ref)
    assert out.shape == x.shape
    assert (out - other).abs().max() > 1e-3
    torch.testing.assert_close(per_token, out, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="full_ref"):
        model(x, t, context, y=y, clip_fea=clip)
    with pytest.raises(ValueError, match="encode the reference image at the video size"):
        model(x, t, context, y=y, clip_fea=clip, full_ref=torch.randn(1, 16, 2, 2))


def test_fun_camera_adapter_adds_to_the_patch_tokens():
    torch.manual_seed(0)
    model = FunWanModel(in_dim=32, add_control_adapter=True, **TINY).eval()
    x, t, context, y, clip = _inputs(32)
    cam = torch.randn(1, 24, 2, 32, 48)
    with torch.no_grad():
        out = model(x, t, context, y=y, clip_fea=clip, y_camera=cam)
        torch.nn.init.zeros_(model.control_adapter.residual_blocks[0].conv2.weight)
        torch.nn.init.zeros_(model.control_adapter.residual_blocks[0].conv2.bias)
        torch.nn.init.zeros_(model.control_adapter.conv.weight)
        torch.nn.init.zeros_(model.control_adapter.conv.bias)
        plain = WanModel(in_dim=32, **TINY).eval()
        plain.load_state_dict(model.state_dict(), strict=False)
        # a zero adapter adds nothing: the model is the plain one
        assert torch.equal(model(x, t, context, y=y, clip_fea=clip, y_camera=cam),
                           plain(x, t, context, y=y, clip_fea=clip))
    assert out.shape == x.shape
    with pytest.raises(ValueError, match="y_camera"):
        model(x, t, context, y=y, clip_fea=clip)


def _pose_file(path, frames):
    lines = ["https://example/video"]
    for i in range(frames):
        w2c = torch.eye(4)[:3].clone()
        w2c[0, 3] = -0.1 * i  # camera moving right
        lines.append(" ".join(str(v) for v in [i, 0.5, 0.9, 0.5, 0.5, 0, 0, *w2c.flatten().tolist()]))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_fun_camera_plucker_of_a_translating_camera(tmp_path):
    poses = read_pose_file(_pose_file(tmp_path / "right.txt", 5))
    rays = plucker_embedding(poses, width=16, height=8)
    assert rays.shape == (5, 8, 16, 6)
    directions = rays[..., 3:]
    torch.testing.assert_close(directions.norm(dim=-1), torch.ones(5, 8, 16))
    # pure translation: directions never change, the moment o x d of frame 0 is zero
    torch.testing.assert_close(directions[4], directions[0])
    assert rays[0, ..., :3].abs().max() == 0 and rays[4, ..., :3].abs().max() > 0.01
    # the ray through the image center looks straight ahead (+z)
    assert rays[0, 3:5, 7:9, 5].min() > 0.99


def test_fun_camera_condition_groups_four_frames_per_latent_frame(tmp_path):
    plucker = torch.arange(9.0)[:, None, None, None].expand(9, 2, 2, 6) + torch.arange(6.0) * 100
    cond = camera_condition(plucker)
    assert cond.shape == (24, 3, 2, 2)
    for channel in range(6):
        for g in range(4):
            assert cond[channel * 4 + g, 0, 0, 0] == 100 * channel  # frame 0 repeated
            assert cond[channel * 4 + g, 2, 0, 0] == 100 * channel + 4 + g + 1
    with pytest.raises(ValueError, match="4k \\+ 1"):
        camera_condition(plucker[:8])
    y_camera = pose_file_condition(_pose_file(tmp_path / "short.txt", 3), width=16, height=8, frame_num=9)
    assert y_camera.shape == (24, 3, 8, 16)
    (tmp_path / "bad.txt").write_text("header\n1 2 3\n")
    with pytest.raises(ValueError, match="19 numbers"):
        read_pose_file(tmp_path / "bad.txt")


def test_fun_golden_camera_plucker_cases():
    """The `camera_plucker` golden cases (also in test_golden.py), selected with `-k fun`."""
    from golden_kinds import run_cases_of_kind

    assert run_cases_of_kind(EXT_DIR / "fun" / "golden", "camera_plucker")


def test_fun_wan22_control_ref_batch_matches_the_reference():
    """Wan2.2-Fun Control with ref_conv, a CFG batch of two with prompts of different lengths: the
    `fp8_transformer` case holds the reference's unquantized output of the same weights."""
    from golden_kinds import assert_close, load_case
    from golden_kinds.fun import build_fun_model, contexts

    case = load_case(EXT_DIR / "fun" / "golden" / "fp8_transformer.safetensors")
    model = build_fun_model(case)
    assert model.has_ref_conv and not model.image_branch
    with torch.no_grad():
        out = model(case.inputs["x"], case.inputs["t"], contexts(case), y=case.inputs["y"],
                    full_ref=case.inputs["full_ref"])
    assert_close(out, case.outputs["out_unquantized"], atol=1e-4, name="fun22 control ref")
