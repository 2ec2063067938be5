"""Wan2.2-Animate-14B: the model against the official manifests, as a composition of WanModel, the
relighting LoRA's keys on our modules (golden parity: test_golden.py, kind `animate`)."""

import json

import pytest
import torch

from conftest import randomize, tiny_dit_config
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
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == manifest["keys"]
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


def _tiny_animate():
    config = tiny_dit_config("i2v", num_layers=5, **TINY_FACE)
    return randomize(WanAnimateModel.from_config(config), std=0.2).eval()


def _inputs(seed=0, frames=9, latent=(4, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    f, h, w = latent
    return dict(x=torch.randn(1, 16, f, h, w, generator=g), t=torch.rand(1, generator=g) * 1000,
                context=torch.randn(1, 7, 32, generator=g), y=torch.randn(1, 20, f, h, w, generator=g),
                clip_fea=torch.randn(1, 257, 1280, generator=g), pose_latents=torch.randn(1, 16, f - 1, h, w, generator=g),
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
        base = WanModel(**tiny_dit_config("i2v", num_layers=5)).eval()
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
        WanAnimateModel(**tiny_dit_config("i2v", num_layers=4), **TINY_FACE)
