"""WanModel: checkpoint compatibility, loading paths, and forward invariants."""

import json

import pytest
import torch

from conftest import randomize, state_shapes, tiny_dit_config
from golden_kinds import REFERENCE_DIR
from wan.checkpoint import CheckpointError, save_sharded, save_state_dict
from wan.configs import PRESETS, get_preset
from wan.model_loading import load_dit
from wan.modules.model import WanModel
from wan.modules.moe import WanMoE


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_state_dict_matches_official_manifest(name):
    preset = get_preset(name)
    with torch.device("meta"):
        model = WanModel(**preset.dit)
    manifest = json.loads((REFERENCE_DIR / "manifests" / f"{preset.manifest}.json").read_text())
    ours = state_shapes(model.state_dict())
    assert ours == manifest["keys"]
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]


def _inputs(config, batch=1, grid=(3, 8, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16 if config["model_type"] != "ti2v" else 48, *grid, generator=g)
    kwargs = {}
    if config["model_type"] in ("i2v", "flf2v"):
        kwargs["y"] = torch.randn(batch, 20, *grid, generator=g)
        kwargs["clip_fea"] = torch.randn(batch * (2 if config["model_type"] == "flf2v" else 1), 257, 1280, generator=g)
    context = torch.randn(batch, 7, config["text_dim"], generator=g)
    t = torch.rand(batch, generator=g) * 1000
    return x, t, context, kwargs


def _tiny_model(model_type="t2v"):
    return randomize(WanModel(**tiny_dit_config(model_type))).eval()


def test_sharded_safetensors_and_pth_load_identically(tmp_path):
    config = tiny_dit_config("i2v")
    model = randomize(WanModel(**config)).eval()
    state = model.state_dict()
    sharded = tmp_path / "sharded"
    save_sharded(state, sharded, max_shard_bytes=200_000)
    (sharded / "config.json").write_text(json.dumps(config))
    assert len(list(sharded.glob("*.safetensors"))) > 1
    torch.save(state, tmp_path / "model.pth")
    # The pre-1.6 format some released .pth files use cannot be memory-mapped.
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)

    loaded_models = [load_dit(sharded), load_dit(tmp_path / "model.pth", config=config),
                     load_dit(tmp_path / "legacy.pth", config=config)]
    x, t, context, kwargs = _inputs(config)
    # Same weights bit for bit; outputs agree to BLAS rounding (kernels depend on memory alignment).
    for loaded in loaded_models:
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), state.values()))
    with torch.no_grad():
        expected = model(x, t, context, **kwargs)
        for loaded in loaded_models:
            torch.testing.assert_close(loaded(x, t, context, **kwargs), expected, atol=1e-6, rtol=0)


def test_renamed_key_error_names_it(tmp_path):
    config = tiny_dit_config()
    state = WanModel(**config).state_dict()
    state["blocks.1.self_attn.query.weight"] = state.pop("blocks.1.self_attn.q.weight")
    save_state_dict(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_dit(tmp_path / "model.safetensors", config=config)
    message = str(err.value)
    assert "1 missing key(s): blocks.1.self_attn.q.weight" in message
    assert "1 unexpected key(s): blocks.1.self_attn.query.weight" in message


def test_missing_checkpoint_and_shard_errors_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nowhere"):
        load_dit(tmp_path / "nowhere.safetensors", config=tiny_dit_config())
    save_sharded(WanModel(**tiny_dit_config()).state_dict(), tmp_path, max_shard_bytes=200_000)
    next(tmp_path.glob("*-00001-of-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing shard"):
        load_dit(tmp_path, config=tiny_dit_config())


def test_self_forcing_checkpoint_unwraps_generator_ema(tmp_path):
    config = tiny_dit_config()
    model = _tiny_model()
    nested = {"generator": {f"model.{k}": torch.zeros_like(v) for k, v in model.state_dict().items()},
              "generator_ema": {f"model.{k}": v for k, v in model.state_dict().items()}}
    torch.save(nested, tmp_path / "self_forcing_dmd.pt")
    loaded = load_dit(tmp_path / "self_forcing_dmd.pt", config=config, nested_key="generator_ema")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_diffusers_layout_loads_into_the_same_model(tmp_path):
    from diffusers import WanTransformer3DModel

    from wan.convert.dit_diffusers import config_to_diffusers, dit_to_diffusers

    config = tiny_dit_config("t2v")
    model = _tiny_model("t2v")
    theirs = WanTransformer3DModel(**config_to_diffusers(config))
    theirs.load_state_dict(dit_to_diffusers(model.state_dict()), strict=True)
    theirs.save_pretrained(tmp_path / "transformer")
    loaded = load_dit(tmp_path / "transformer", config={**config})
    x, t, context, _ = _inputs(config)
    with torch.no_grad():
        ours = model(x, t, context)
        torch.testing.assert_close(loaded(x, t, context), ours, atol=1e-6, rtol=0)
        ctx = torch.nn.functional.pad(context, (0, 0, 0, config["text_len"] - context.shape[1]))
        reference = theirs(x, t, ctx, return_dict=False)[0]
    assert (reference - ours).abs().max() < 1e-5


def test_folded_padding_equals_explicit_padding_and_list_form():
    """A short prompt (padding folded into one weighted key) gives what the fully padded prompt gives."""
    model = _tiny_model("i2v")
    x, t, context, kwargs = _inputs(tiny_dit_config("i2v"), batch=2)
    padded = torch.nn.functional.pad(context, (0, 0, 0, 16 - context.shape[1]))
    prompts = [context[0, :3], context[1]]  # different lengths in one batch
    with torch.no_grad():
        out = model(x, t, context, **kwargs)
        torch.testing.assert_close(model(x, t, padded, **kwargs), out, atol=1e-5, rtol=1e-5)
        mixed = model(x, t, prompts, **kwargs)
        first = model(x[:1], t[:1], padded[:1, :3], y=kwargs["y"][:1], clip_fea=kwargs["clip_fea"][:1])
        torch.testing.assert_close(mixed[:1], first, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mixed[1:], out[1:], atol=1e-5, rtol=1e-5)


def test_batch_equals_samples_run_alone():
    model = _tiny_model("i2v")
    x, t, context, kwargs = _inputs(tiny_dit_config("i2v"), batch=2)
    with torch.no_grad():
        batched = model(x, t, context, **kwargs)
        for i in range(2):
            alone = model(x[i:i + 1], t[i:i + 1], context[i:i + 1], y=kwargs["y"][i:i + 1],
                          clip_fea=kwargs["clip_fea"][i:i + 1])
            torch.testing.assert_close(batched[i:i + 1], alone, atol=1e-5, rtol=1e-5)


def test_per_token_timesteps_equal_scalar_when_constant():
    model = _tiny_model("ti2v")
    x, t, context, _ = _inputs(tiny_dit_config("ti2v"))
    num_tokens = 3 * 4 * 6
    with torch.no_grad():
        torch.testing.assert_close(model(x, t[:, None].expand(1, num_tokens), context), model(x, t, context))


def test_bad_inputs_raise_clear_errors():
    model = _tiny_model("i2v")
    x, t, context, kwargs = _inputs(tiny_dit_config("i2v"))
    with pytest.raises(ValueError, match="36 input channels"):
        model(x, t, context, clip_fea=kwargs["clip_fea"])
    with pytest.raises(ValueError, match="needs CLIP image features"):
        model(x, t, context, y=kwargs["y"])
    with pytest.raises(ValueError, match="not divisible by patch size"):
        model(x[..., :7], t, context, y=kwargs["y"][..., :7], clip_fea=kwargs["clip_fea"])
    with pytest.raises(ValueError, match="more than text_len"):
        model(x, t, torch.randn(1, 17, 32), **kwargs)


def test_gradient_checkpointing_gives_same_gradients():
    model = _tiny_model()
    x, t, context, _ = _inputs(tiny_dit_config())
    model(x, t, context).square().mean().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_gradient_checkpointing(True)
    model(x, t, context).square().mean().backward()
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g)


def test_bf16_parameters_run_and_stay_close_to_fp32():
    model = _tiny_model()
    x, t, context, _ = _inputs(tiny_dit_config())
    with torch.no_grad():
        reference = model(x, t, context)
        out = model.to(torch.bfloat16)(x, t, context)
    assert out.dtype == torch.float32
    assert (out - reference).abs().max() < 0.1 * reference.abs().max()


def test_moe_routes_by_boundary_and_offloads():
    high, low = _tiny_model(), randomize(WanModel(**tiny_dit_config()), seed=1).eval()
    moe = WanMoE(high, low, boundary=0.875, offload=True, device="cpu")
    x, _, context, _ = _inputs(tiny_dit_config())
    with torch.no_grad():
        assert torch.equal(moe(x, torch.tensor([900.0]), context), high(x, torch.tensor([900.0]), context))
        assert moe.last_expert == "high_noise_model"
        assert torch.equal(moe(x, torch.tensor([875.0]), context), high(x, torch.tensor([875.0]), context))
        assert torch.equal(moe(x, torch.tensor([874.0]), context), low(x, torch.tensor([874.0]), context))
        assert moe.last_expert == "low_noise_model"
    with pytest.raises(ValueError, match="straddle"):
        moe(torch.cat([x, x]), torch.tensor([900.0, 100.0]), torch.cat([context, context]))
