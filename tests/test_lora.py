"""LoRA: injection by patterns, exact merge/unmerge, the ComfyUI/diffusers file format, parameter counts."""

import pytest
import torch

from conftest import randomize, tiny_dit_config
from wan.configs import get_preset
from wan.lora import (count_parameters, fuse_lora, inject_lora, load_lora, lora_modules, merge_lora,
                      parameter_report, read_lora, save_lora, unmerge_lora)
from wan.modules.model import WanModel

TARGETS = ["blocks.*.self_attn.q", "blocks.*.self_attn.o", "blocks.*.cross_attn.k", "blocks.*.ffn.0",
           "blocks.1.ffn.2"]


def _inputs(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 3, 4, 6, generator=g)
    t = torch.tensor([700.0, 150.0])
    return x, t, torch.randn(2, 5, config["text_dim"], generator=g)


def _lora_model(dtype=torch.float32, rank=4, alpha=8, seed=1):
    """A random tiny t2v model with LoRA on TARGETS, lora_B made non-zero."""
    model = randomize(WanModel(**tiny_dit_config())).to(dtype).eval()
    inject_lora(model, TARGETS, rank=rank, alpha=alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)
    return model


def test_lora_injects_by_pattern_and_trains_only_adapters():
    model = _lora_model()
    names = sorted(lora_modules(model))
    assert names == sorted(["blocks.0.self_attn.q", "blocks.1.self_attn.q", "blocks.0.self_attn.o", "blocks.1.self_attn.o",
                            "blocks.0.cross_attn.k", "blocks.1.cross_attn.k", "blocks.0.ffn.0", "blocks.1.ffn.0",
                            "blocks.1.ffn.2"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.lora_{ab}.weight" for m in names for ab in "AB"}
    # the base keeps its official parameter names
    assert "blocks.0.self_attn.q.weight" in model.state_dict()
    trainable_count, total = count_parameters(model)
    assert trainable_count == sum(4 * (m.in_features + m.out_features) for m in lora_modules(model).values())
    assert total == trainable_count + sum(p.numel() for p in WanModel(**tiny_dit_config()).parameters())


def test_lora_starts_as_the_base_model():
    base = randomize(WanModel(**tiny_dit_config())).eval()
    x, t, context = _inputs(tiny_dit_config())
    with torch.no_grad():
        before = base(x, t, context)
        inject_lora(base, TARGETS, rank=4, init="gaussian")
        torch.testing.assert_close(base(x, t, context), before, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_merged_equals_unmerged_and_unmerge_is_exact(dtype):
    model = _lora_model(dtype)
    x, t, context = _inputs(tiny_dit_config())
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        unmerged = model(x, t, context)
        merge_lora(model)
        merged = model(x, t, context)
        unmerge_lora(model)
        again = model(x, t, context)
    tolerance = 1e-5 if dtype == torch.float32 else 0.05
    assert (merged - unmerged).abs().max() < tolerance
    for key, value in model.state_dict().items():
        assert torch.equal(value, base_weights[key]), key
    assert torch.equal(again, unmerged)


def test_lora_file_round_trip_load_and_fuse(tmp_path):
    model = _lora_model(alpha=2)
    path = tmp_path / "lora.safetensors"
    save_lora(model, path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert "diffusion_model.blocks.0.self_attn.q.lora_A.weight" in keys
    assert "diffusion_model.blocks.0.self_attn.q.lora_B.weight" in keys
    assert "diffusion_model.blocks.0.self_attn.q.alpha" in keys
    assert read_lora(path)["blocks.1.ffn.2"][2] == 2.0

    x, t, context = _inputs(tiny_dit_config())
    with torch.no_grad():
        ours = model(x, t, context)
        loaded = randomize(WanModel(**tiny_dit_config())).eval()
        load_lora(loaded, path)
        torch.testing.assert_close(loaded(x, t, context), ours, atol=1e-6, rtol=0)
        fused = randomize(WanModel(**tiny_dit_config())).eval()
        assert sorted(fuse_lora(fused, path)) == sorted(lora_modules(model))
        torch.testing.assert_close(fused(x, t, context), ours, atol=1e-5, rtol=0)
        half = randomize(WanModel(**tiny_dit_config())).eval()
        fuse_lora(half, path, scale=0.5)
        fuse_lora(half, path, scale=0.5)  # stacking: two halves make one
        torch.testing.assert_close(half(x, t, context), ours, atol=1e-5, rtol=0)


def test_lora_loads_into_diffusers_wan_transformer_with_the_same_output(tmp_path):
    pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft")
    from diffusers import WanPipeline, WanTransformer3DModel

    from wan.convert.dit_diffusers import config_to_diffusers, dit_to_diffusers

    config = tiny_dit_config()
    model = _lora_model(alpha=2)
    path = tmp_path / "lora.safetensors"
    save_lora(model, path)

    base = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    theirs = WanTransformer3DModel(**config_to_diffusers(config))
    theirs.load_state_dict(dit_to_diffusers(base), strict=True)
    state = WanPipeline.lora_state_dict(str(path))
    theirs.load_lora_adapter(state, prefix="transformer", adapter_name="ours")
    theirs.eval()

    x, t, context = _inputs(config)
    padded = torch.nn.functional.pad(context, (0, 0, 0, config["text_len"] - context.shape[1]))
    with torch.no_grad():
        ours = model(x, t, context)
        reference = theirs(x, t, padded, return_dict=False)[0]
        # and our loader reads diffusers-layout LoRA keys back
        assert all(k.startswith("transformer.blocks.") for k in state)
        reloaded = randomize(WanModel(**config)).eval()
        load_lora(reloaded, state)
        torch.testing.assert_close(reloaded(x, t, context), ours, atol=1e-5, rtol=0)
    assert (reference - ours).abs().max() < 1e-4


def test_lora_parameter_report_of_i2v_14B_on_meta():
    with torch.device("meta"):
        model = WanModel.from_config(get_preset("i2v-14B").dit)
    inject_lora(model, ["blocks.*.cross_attn.k_img", "blocks.*.cross_attn.v_img"], rank=16)
    assert count_parameters(model)[0] == 40 * 2 * 16 * (5120 + 5120)
    assert parameter_report(model) == "trainable 13.1M of 16.4B parameters (0.08%)"


def test_lora_pattern_matching_nothing_is_an_error():
    model = WanModel(**tiny_dit_config())
    with pytest.raises(ValueError, match=r"blocks\.\*\.cross_attn\.k_img.*match no nn.Linear"):
        inject_lora(model, ["blocks.*.self_attn.q", "blocks.*.cross_attn.k_img"], rank=4)
