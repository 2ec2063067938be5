"""LoRA files in kohya, ComfyUI/musubi, PEFT and diffusers layouts: the same update whatever the
layout, exact unmerge, fp8 ordering, clear errors (golden merge parity: tests/golden_kinds/fun.py)."""

import pytest
import torch

from conftest import randomize, tiny_dit_config
from wan.checkpoint import save_state_dict
from wan.lora import fuse_lora
from wan.lora_formats import lora_format, merge_lora_files, read_lora_for
from wan.modules.model import WanModel

pytestmark = pytest.mark.usefixtures("single_thread")

# official module -> its diffusers name (written out here, independent of the key table)
MODULES = {
    "blocks.0.self_attn.q": "blocks.0.attn1.to_q",
    "blocks.1.cross_attn.k_img": "blocks.1.attn2.add_k_proj",
    "blocks.0.ffn.0": "blocks.0.ffn.net.0.proj",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
}


def _model():
    torch.manual_seed(0)
    return randomize(WanModel(**tiny_dit_config("i2v", clip_dim=32))).eval()


def _updates(model, rank=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    updates = {}
    for name in MODULES:
        out_features, in_features = model.get_submodule(name).weight.shape
        updates[name] = (torch.randn(rank, in_features, generator=g), torch.randn(out_features, rank, generator=g),
                         torch.tensor(2.0))
    return updates


def _file(updates, layout):
    state = {}
    for name, (down, up, alpha) in updates.items():
        if layout == "kohya":  # VideoX-Fun's trainer (empty root path: double underscore)
            stem, a, b = "lora_unet__" + name.replace(".", "_"), "lora_down.weight", "lora_up.weight"
        elif layout == "musubi":
            stem, a, b = "lora_unet_" + name.replace(".", "_"), "lora_down.weight", "lora_up.weight"
        elif layout == "comfyui":
            stem, a, b = "diffusion_model." + name, "lora_A.weight", "lora_B.weight"
        elif layout == "peft":
            stem, a, b = "base_model.model." + name, "lora_A.default.weight", "lora_B.default.weight"
        else:
            stem, a, b = "transformer." + MODULES[name], "lora_A.weight", "lora_B.weight"
        state[f"{stem}.{a}"], state[f"{stem}.{b}"] = down, up
        if layout != "peft":  # PEFT keeps alpha in adapter_config.json: alpha = rank here
            state[f"{stem}.alpha"] = alpha
    return state


LAYOUTS = ["kohya", "musubi", "comfyui", "peft", "diffusers"]


def test_lora_format_detection():
    updates = _updates(_model())
    assert [lora_format(_file(updates, layout)) for layout in LAYOUTS] == \
        ["kohya", "kohya", "comfyui", "peft", "diffusers"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_lora_format_merges_the_documented_update(layout, tmp_path):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    updates = _updates(model)
    path = tmp_path / f"{layout}.safetensors"
    save_state_dict(_file(updates, layout), path)
    assert sorted(fuse_lora(model, path, scale=0.55)) == sorted(MODULES)  # what inference.py --lora calls
    for name, (down, up, alpha) in updates.items():
        alpha = 4.0 if layout == "peft" else float(alpha)
        expected = before[f"{name}.weight"] + 0.55 * alpha / 4 * up @ down
        torch.testing.assert_close(model.get_submodule(name).weight, expected, rtol=0, atol=1e-5)
    untouched = [k for k in before if k.rsplit(".", 1)[0] not in MODULES]
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in untouched)


def test_lora_format_unmerge_restores_fp32_weights_exactly():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merge_lora_files(model, [(_file(_updates(model, seed=1), "kohya"), 0.8),
                                      (_file(_updates(model, seed=2), "diffusers"), 1.7)])
    assert not torch.equal(model.blocks[0].self_attn.q.weight, before["blocks.0.self_attn.q.weight"])
    merged.unmerge()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_lora_format_merge_refuses_fp8_weights():
    model = _model()
    lora = _file(_updates(model), "comfyui")
    model.blocks[0].self_attn.q.weight.data = model.blocks[0].self_attn.q.weight.data.to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="before fp8 quantization"):
        merge_lora_files(model, [(lora, 1.0)])


def test_lora_format_errors_name_the_problem(caplog):
    model = _model()
    lora = _file(_updates(model), "kohya")
    lora["lora_te_encoder_block_0_q.lora_down.weight"] = torch.zeros(4, 8)
    assert len(read_lora_for(model, lora)) == len(MODULES)
    assert "text-encoder" in caplog.text
    with pytest.raises(ValueError, match="match no module of WanModel: lora_unet_blocks_9_self_attn_q"):
        read_lora_for(model, {**lora, "lora_unet_blocks_9_self_attn_q.lora_down.weight": torch.zeros(4, 64)})
    wrong = _file(_updates(WanModel(**tiny_dit_config("i2v", clip_dim=32, dim=32))), "comfyui")
    with pytest.raises(ValueError, match="does not fit its weight"):
        read_lora_for(model, wrong)
    with pytest.raises(ValueError, match="lacks its up/B weight"):
        read_lora_for(model, {"diffusion_model.head.head.lora_A.weight": torch.zeros(4, 64)})


def test_lora_format_golden_merge_cases():
    """The `lora_merge` golden cases (also in test_golden.py), selected with `-k lora_format`."""
    from golden_kinds import EXT_DIR, run_cases_of_kind

    assert run_cases_of_kind(EXT_DIR / "fun" / "golden", "lora_merge")
