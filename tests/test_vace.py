"""Wan2.1 VACE: the model against the official manifests and as a composition of WanModel, and the
context encoding (the golden parity cases are in test_golden.py, kinds `vace` / `vace_encode`)."""

import json

import pytest
import torch

from conftest import mp4_frames, randomize, run_inference_main, state_shapes, tiny_dit_config
from golden_kinds import EXT_DIR
from pipelines.extensions.vace import VACE_LAYERS, vace_dit_config
from pipelines.vace_context import pack_mask, vace_context
from wan.configs import get_preset
from wan.modules.model import WanModel
from wan.modules.vace import VaceWanModel
from wan.modules.vae2_1 import WanVAE21

MANIFESTS = EXT_DIR / "variants" / "manifests"


@pytest.mark.parametrize("size", ["1.3B", "14B"])
def test_vace_state_dict_matches_official_manifest(size):
    config = vace_dit_config({**get_preset(f"t2v-{size}").dit, "vace_in_dim": 96})
    with torch.device("meta"):
        model = VaceWanModel.from_config(config)
    manifest = json.loads((MANIFESTS / f"wan2.1_vace_{size}.json").read_text())
    assert state_shapes(model.state_dict()) == manifest["keys"]
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]
    assert model.vace_layers == VACE_LAYERS[config["dim"]]


def _tiny_vace(vace_layers=(0, 1)):
    config = tiny_dit_config("t2v", num_layers=3, vace_layers=list(vace_layers), vace_in_dim=96)
    return randomize(VaceWanModel.from_config(config)).eval()


def _inputs(seed=0, grid=(3, 4, 6)):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, *grid, generator=g), torch.rand(1, generator=g) * 1000,
            torch.randn(1, 7, 32, generator=g), torch.randn(1, 96, *grid, generator=g))


def test_vace_scale_zero_is_the_base_model():
    model = _tiny_vace()
    base = WanModel(**tiny_dit_config("t2v", num_layers=3)).eval()
    base.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("vace_")})
    x, t, context, c = _inputs()
    with torch.no_grad():
        plain = base(x, t, context)
        assert torch.allclose(model(x, t, context, vace_context=c, context_scale=0.0), plain, atol=1e-6)
        hinted = model(x, t, context, vace_context=c, context_scale=1.0)
    assert (hinted - plain).abs().max() > 1e-2


def test_vace_hints_follow_the_configured_layers():
    """A hint is added only after the blocks of vace_layers: zeroing the after_proj of the context
    block of layer 2 leaves the output unchanged iff no hint is added after block 2."""
    model = _tiny_vace((0, 2))
    x, t, context, c = _inputs(1)
    with torch.no_grad():
        out = model(x, t, context, vace_context=c)
        model.vace_blocks[1].after_proj.weight.zero_()
        model.vace_blocks[1].after_proj.bias.zero_()
        assert (model(x, t, context, vace_context=c) - out).abs().max() > 1e-3


def test_vace_bad_inputs_are_named():
    model = _tiny_vace()
    x, t, context, c = _inputs()
    with pytest.raises(ValueError, match="vace_context must be"):
        model(x, t, context, vace_context=c[:, :16])
    with pytest.raises(ValueError, match="same frames"):
        model(x, t, context, vace_context=c[:, :, :2])
    with pytest.raises(ValueError, match="starting with 0"):
        VaceWanModel(**tiny_dit_config("t2v"), vace_layers=[1])


def test_vace_packed_mask_takes_nearest_exactmp4_frames():
    """81 pixel frames -> 21 latent frames 1, 5, 9, ..., 21, 25, 28, 32, ... (not every 4th from 0);
    channel 8 * dy + dx holds pixel (dy, dx) of each 8x8 block."""
    mask = torch.arange(81.0)[:, None, None].expand(81, 16, 16).clone()[None]
    packed = pack_mask(mask, num_refs=2)
    assert packed.shape == (64, 23, 2, 2)
    assert packed[:, :2].abs().sum() == 0
    frames = packed[0, 2:, 0, 0].long().tolist()
    assert frames == [int((j + 0.5) * 81 / 21) for j in range(21)]
    assert frames[:8] == [1, 5, 9, 13, 17, 21, 25, 28]
    pixel = torch.zeros(1, 5, 16, 16)
    pixel[0, :, 8 + 3, 5] = 1  # block (1, 0), dy 3, dx 5
    assert pack_mask(pixel)[8 * 3 + 5, :, 1, 0].tolist() == [1.0, 1.0]


def test_vace_context_splits_at_the_binarized_mask():
    vae = randomize(WanVAE21(dim=8), std=0.1).eval()
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(3, 1, 16, 16, generator=g) * 2 - 1
    keep_all = vace_context(vae, frames, torch.full((1, 1, 16, 16), 0.4))  # below 0.5: nothing to generate
    with torch.no_grad():
        zero = vae.encode(torch.zeros(1, 3, 1, 16, 16))[0]
        whole = vae.encode(frames[None])[0]
    assert keep_all.shape == (96, 1, 2, 2)
    assert torch.allclose(keep_all[:16], whole, atol=1e-5) and torch.allclose(keep_all[16:32], zero, atol=1e-5)
    assert torch.allclose(keep_all[32:], torch.full_like(keep_all[32:], 0.4))
    ref = torch.rand(3, 1, 16, 16, generator=g) * 2 - 1
    with_ref = vace_context(vae, frames, torch.ones(1, 1, 16, 16), [ref])
    with torch.no_grad():
        ref_latent = vae.encode(ref[None])[0]
    assert with_ref.shape == (96, 2, 2, 2)
    assert torch.allclose(with_ref[:16, :1], ref_latent, atol=1e-5) and with_ref[16:, 0].abs().sum() == 0
    assert torch.allclose(with_ref[:16, 1:], zero, atol=1e-5) and torch.allclose(with_ref[16:32, 1:], whole, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_vace_folder(tmp_path_factory):
    from pipelines.extensions import extension_tasks

    return extension_tasks()["vace"].make_tiny(tmp_path_factory.mktemp("ckpt") / "vace", seed=0)


def _write_inputs(folder):
    """A 5-frame 32x32 source video, a mask (frame folder: right half generated) and a reference image."""
    from PIL import Image

    from pipelines.video_io import save_video

    g = torch.Generator().manual_seed(0)
    save_video(torch.rand(3, 5, 32, 32, generator=g) * 2 - 1, folder / "src.mp4", fps=16)
    (folder / "mask").mkdir()
    for i in range(5):
        mask = Image.new("RGB", (32, 32), (0, 0, 0))
        mask.paste((255, 255, 255), (16, 0, 32, 32))
        mask.save(folder / "mask" / f"{i:03d}.png")
    Image.new("RGB", (40, 24), (200, 30, 30)).save(folder / "ref.png")


def test_vace_inference_edits_with_mask_and_reference_and_extends(tiny_vace_folder, tmp_path):
    _write_inputs(tmp_path)
    (tmp_path / "edit.txt").write_text("src.mp4\tmask\tref.png\ta red ball\n")
    (tmp_path / "extend.txt").write_text("src.mp4\t\tcontinue it\n")
    (tmp_path / "scale.yaml").write_text("context_scale: 0.5\nsample_steps: 1\n")
    common = ["--checkpoint_dir", tiny_vace_folder, "--device", "cpu"]
    assert run_inference_main("--task", "vace", "--data_path", tmp_path / "edit.txt", "--output_folder",
                              tmp_path / "out", "--config_path", tmp_path / "scale.yaml", *common) == 0
    assert run_inference_main("--task", "vace_extend", "--data_path", tmp_path / "extend.txt", "--frame_num", 5,
                              "--output_folder", tmp_path / "ext", *common) == 0
    videos = sorted((tmp_path / "out").glob("*.mp4"))
    assert [len(mp4_frames(v)) for v in videos] == [5]
    sidecar = json.loads(videos[0].with_suffix(".json").read_text())
    assert sidecar["context_scale"] == 0.5 and sidecar["sample_shift"] == 16.0 and sidecar["sample_steps"] == 1
    assert sidecar["inputs"]["src_mask"].endswith("mask")
    extended = next((tmp_path / "ext").glob("*.mp4"))
    assert len(mp4_frames(extended)) == 5 and mp4_frames(extended)[0].shape == (32, 32, 3)


def test_vace_source_frames_modes(tmp_path):
    from pipelines.extensions.vace import source_frames
    from pipelines.validation import InvalidInput

    _write_inputs(tmp_path)
    frames, mask = source_frames({"src_video": tmp_path / "src.mp4", "src_mask": tmp_path / "mask"}, 64, 64, 81)
    assert frames.shape == (3, 5, 64, 64) and mask.shape == (1, 5, 64, 64)
    assert mask[..., :30].max() == 0 and mask[..., 34:].min() == 1
    frames, mask = source_frames({"src_video": tmp_path / "src.mp4"}, 32, 32, 17, extend=True)
    assert frames.shape[1] == 17 and mask[0, :5].max() == 0 and mask[0, 5:].min() == 1
    assert frames[:, 5:].abs().max() == 0
    frames, mask = source_frames({"src_video": tmp_path / "src.mp4"}, 32, 32, 3)
    assert frames.shape[1] == 1 and mask.min() == 1  # 3 frames asked: rounded down to 4n+1
    frames, mask = source_frames({}, 64, 64, 5)
    assert frames.abs().max() == 0 and mask.min() == 1 and mask.shape[1] == 5
    with pytest.raises(InvalidInput, match="src_mask was given without src_video"):
        source_frames({"src_mask": tmp_path / "mask"}, 64, 64, 5)
