"""Wan2.2-Animate-14B: the model against the official manifests, as a composition of WanModel, the
relighting LoRA's keys on our modules (golden parity: test_golden.py, kind `animate`)."""

import json

import pytest
import torch

from conftest import mp4_fps, mp4_frames, randomize, run_inference_main, state_shapes, tiny_dit_config
from golden_kinds import EXT_DIR
from wan.configs import get_preset
from wan.lora import load_lora, lora_modules
from wan.modules.animate import WanAnimateModel
from wan.modules.model import WanModel

MANIFESTS = EXT_DIR / "variants" / "manifests"


def _manifest(name):
    return json.loads((MANIFESTS / f"{name}.json").read_text())


def _animate_14b():
    with torch.device("meta"):
        return WanAnimateModel.from_config({**get_preset("i2v-14B").dit, "model_type": "animate"})


def test_animate_state_dict_matches_official_manifest():
    model = _animate_14b()
    manifest = _manifest("wan2.2_animate_14B")
    assert state_shapes(model.state_dict()) == manifest["keys"]
    assert sum(v.numel() for v in model.state_dict().values()) == manifest["num_params"]


def test_animate_relighting_lora_loads_onto_our_modules():
    """The release's LoRA keys (peft names, no prefix) load through wan.lora onto exactly the 480
    nn.Linear modules of blocks.* outside face*/modulation, with the manifest's shapes."""
    model = _animate_14b()
    manifest = _manifest("wan2.2_animate_14B_relighting_lora")
    lora = {k: torch.empty(shape, device="meta") for k, shape in manifest["keys"].items()}
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")}
    names = load_lora(model, lora)
    assert len(names) == 480 and set(names) == set(lora_modules(model)) == linears
    assert all(m.rank == manifest["rank"] and m.scaling == 1.0 for m in lora_modules(model).values())


TINY_FACE = dict(face_size=16, face_channels={16: 8, 8: 16, 4: 16}, style_dim=32, face_encoder_width=8)


TINY_CLIP = dict(clip_dim=32, clip_tokens=5)


def _tiny_animate():
    config = tiny_dit_config("i2v", num_layers=5, **TINY_CLIP, **TINY_FACE)
    return randomize(WanAnimateModel.from_config(config), std=0.2).eval()


def _inputs(seed=0, frames=9, latent=(4, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    f, h, w = latent
    return dict(x=torch.randn(1, 16, f, h, w, generator=g), t=torch.rand(1, generator=g) * 1000,
                context=torch.randn(1, 7, 32, generator=g), y=torch.randn(1, 20, f, h, w, generator=g),
                clip_fea=torch.randn(1, 5, 32, generator=g), pose_latents=torch.randn(1, 16, f - 1, h, w, generator=g),
                face_pixel_values=torch.rand(1, 3, frames, 16, 16, generator=g) * 2 - 1)


def _run(model, inputs):
    inputs = dict(inputs)
    return model(inputs.pop("x"), inputs.pop("t"), inputs.pop("context"), **inputs)


def test_animate_without_face_and_pose_is_the_i2v_model():
    """Zero face adapters' output projections and the pose embedding: the Animate model is the i2v
    WanModel with its weights (the composition adds nothing else)."""
    model = _tiny_animate()
    inputs = _inputs()
    with torch.no_grad():
        full = _run(model, inputs)
        for p in [*model.pose_patch_embedding.parameters(), *(p for b in model.face_adapter.fuser_blocks
                                                               for p in b.linear2.parameters())]:
            p.zero_()
        base = WanModel(**tiny_dit_config("i2v", num_layers=5, **TINY_CLIP)).eval()
        base.load_state_dict({k: v for k, v in model.state_dict().items() if k in base.state_dict()})
        reduced = _run(model, inputs)
        plain = base(inputs["x"], inputs["t"], inputs["context"], y=inputs["y"], clip_fea=inputs["clip_fea"])
    assert torch.allclose(reduced, plain, atol=1e-5)
    assert (full - plain).abs().max() > 1e-2


def test_animate_face_tokens_follow_their_latent_frame():
    """Changing the face crops of the last 4 pixel frames changes only the last latent frame's
    face tokens (the causal face encoder never looks ahead)."""
    model = _tiny_animate()
    inputs = _inputs(1)
    with torch.no_grad():
        faces = model.encode_faces(inputs["face_pixel_values"])
        changed = inputs["face_pixel_values"].clone()
        changed[:, :, 5:] = -1
        faces_changed = model.encode_faces(changed)
    assert faces.shape == (1, 4, 5, 64)
    assert faces[:, 0].abs().max() == 0
    assert torch.equal(faces[:, :3], faces_changed[:, :3]) and not torch.equal(faces[:, 3], faces_changed[:, 3])


def test_animate_bad_inputs_are_named():
    model = _tiny_animate()
    inputs = _inputs()
    with pytest.raises(ValueError, match="face frames"):
        _run(model, {**inputs, "face_pixel_values": inputs["face_pixel_values"][:, :, :4]})
    with pytest.raises(ValueError, match="pose latents"):
        _run(model, {**inputs, "pose_latents": inputs["x"]})
    with pytest.raises(ValueError, match="face crops must be"):
        _run(model, {**inputs, "face_pixel_values": torch.zeros(1, 3, 9, 8, 8)})
    with pytest.raises(ValueError, match="multiple of 5"):
        WanAnimateModel(**tiny_dit_config("i2v", num_layers=4), **TINY_CLIP, **TINY_FACE)


def test_animate_clip_bookkeeping_matches_the_release():
    from pipelines.animate_inputs import clip_starts, fold_frame_mask, padded_length, pingpong_indices
    from pipelines.conditioning import known_frame_mask

    assert padded_length(77, 77, 1) == 77 and padded_length(7, 5, 1) == 9 and padded_length(100, 77, 5) == 149
    assert pingpong_indices(3, 7) == [0, 1, 2, 1, 0, 1, 2] and pingpong_indices(1, 3) == [0, 0, 0]
    assert clip_starts(9, 5, 1) == [0, 4] and clip_starts(149, 77, 5) == [0, 72]
    first_known = torch.zeros(9, 2, 3)
    first_known[0] = 1
    assert torch.equal(fold_frame_mask(first_known), known_frame_mask(9, 2, 3))


@pytest.fixture(scope="module")
def tiny_animate_folder(tmp_path_factory):
    from pipelines.extensions import extension_tasks

    return extension_tasks()["animate"].make_tiny(tmp_path_factory.mktemp("ckpt") / "animate", seed=0)


def _write_animate_inputs(folder, frames=7):
    from PIL import Image

    from pipelines.video_io import save_video

    g = torch.Generator().manual_seed(0)
    save_video(torch.rand(3, frames, 32, 32, generator=g) * 2 - 1, folder / "pose.mp4")
    save_video(torch.rand(3, frames, 32, 32, generator=g) * 2 - 1, folder / "bg.mp4")
    for name, size in (("faces", 16), ("mask", 32)):
        (folder / name).mkdir()
        for i in range(frames):
            image = Image.new("RGB", (size, size), (0, 0, 0))
            image.paste((255, 255, 255), (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
            image.save(folder / name / f"{i:03d}.png")
    Image.new("RGB", (24, 40), (30, 200, 30)).save(folder / "ref.png")


def test_animate_inference_animate_and_replace_modes(tiny_animate_folder, tmp_path):
    """Animate mode, 7 pose frames in clips of 5 overlapping by 1: two clips over the ping-pong padded
    9 frames, trimmed back to 7. Replace mode (5 frames, one clip) with classifier-free guidance."""
    for name, frames in (("long", 7), ("short", 5)):
        (tmp_path / name).mkdir()
        _write_animate_inputs(tmp_path / name, frames)
    (tmp_path / "long" / "animate.txt").write_text("ref.png\tpose.mp4\tfaces\t\t\ta person dances\n")
    (tmp_path / "short" / "replace.txt").write_text("ref.png\tpose.mp4\tfaces\tbg.mp4\tmask\ta person dances\n")
    common = ["--checkpoint_dir", tiny_animate_folder, "--device", "cpu", "--task", "animate", "--sample_steps", 1]
    assert run_inference_main("--data_path", tmp_path / "long" / "animate.txt", "--output_folder", tmp_path / "a",
                              *common) == 0
    assert run_inference_main("--data_path", tmp_path / "short" / "replace.txt", "--output_folder", tmp_path / "r",
                              "--guide_scale", 2.0, *common) == 0
    for out, mode, length in (("a", "animate", 7), ("r", "replace", 5)):
        video = next((tmp_path / out).glob("*.mp4"))
        frames = mp4_frames(video)
        assert len(frames) == length and frames[0].shape == (32, 32, 3) and mp4_fps(video) == 30
        sidecar = json.loads(video.with_suffix(".json").read_text())
        assert sidecar["mode"] == mode and sidecar["frame_num"] == 5 and sidecar["refert_num"] == 1


def test_animate_bad_prompt_lines_fail_with_the_fix(tiny_animate_folder, tmp_path):
    from pipelines.validation import InvalidInput

    _write_animate_inputs(tmp_path, frames=3)
    (tmp_path / "half.txt").write_text("ref.png\tpose.mp4\tfaces\tbg.mp4\t\tx\n")
    args = ["--checkpoint_dir", tiny_animate_folder, "--device", "cpu", "--task", "animate",
            "--output_folder", tmp_path / "o"]
    with pytest.raises(InvalidInput, match="both bg_video and mask_video"):
        run_inference_main("--data_path", tmp_path / "half.txt", *args)


def test_animate_relighting_lora_option_fuses_the_folder_file(tiny_animate_folder, tmp_path):
    """`use_relighting_lora` reads `relighting_lora.ckpt` ({"state_dict": peft keys}) beside the DiT and
    adds B @ A (alpha = rank) into each targeted weight; the other weights stay as loaded."""
    import shutil

    from pipelines.extensions.animate import RELIGHTING_LORA, load_animate_dit

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_animate_folder, folder)
    g = torch.Generator().manual_seed(0)
    targets = ["blocks.0.self_attn.q", "blocks.3.cross_attn.k_img", "blocks.4.ffn.2"]
    plain = load_animate_dit(folder, 32, torch.float32, "cpu")
    state = {}
    for name in targets:
        weight = plain.get_submodule(name).weight
        state[f"{name}.lora_A.weight"] = torch.randn(4, weight.shape[1], generator=g)
        state[f"{name}.lora_B.weight"] = torch.randn(weight.shape[0], 4, generator=g)
    torch.save({"state_dict": state}, folder / RELIGHTING_LORA)
    relit = load_animate_dit(folder, 32, torch.float32, "cpu", relighting_lora=True)
    before, after = plain.state_dict(), relit.state_dict()
    for key in before:
        module = key.rsplit(".", 1)[0]
        if module in targets and key.endswith("weight"):
            delta = state[f"{module}.lora_B.weight"] @ state[f"{module}.lora_A.weight"]  # alpha / rank = 1
            assert torch.allclose(after[key], before[key] + delta, atol=1e-5), key
        else:
            assert torch.equal(after[key], before[key]), key
