"""TeaCache and cfg_skip_ratio in the sampling loop (the golden trace is in tests/golden_kinds/fun.py)."""

import pytest
import torch

from pipelines.loading import load_components
from pipelines.tiny_checkpoint import make_tiny_checkpoint
from pipelines.wan_video import SampleSettings, WanVideoPipeline
from wan.modules.model import WanModel
from wan.modules.moe import WanMoE
from wan.samplers.cfg_skip import cfg_skipped
from wan.teacache import COEFFICIENTS, TeaCache, polynomial, teacache_coefficients

pytestmark = pytest.mark.usefixtures("single_thread")

SETTINGS = dict(size="64*64", frame_num=5, sample_steps=6, seed=2)
PROMPT = "a boat on a lake at dawn"


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    """A tiny t2v model whose decoder is the identity (the tests compare sampled latents), with the time
    projection bias shifted as in the golden trace so e0 changes in the range the polynomials fit."""
    components = load_components(make_tiny_checkpoint("t2v", tmp_path_factory.mktemp("tea") / "t2v"), "t2v")
    components.vae.decode = lambda latent, tiled=False: latent
    bias = components.dit.time_projection[1].bias
    with torch.no_grad():
        bias += 5 * torch.randn(bias.shape, generator=torch.Generator().manual_seed(0))
    return components


@pytest.fixture(scope="module")
def plain(components):
    return _generate(components)


def _generate(components, teacache=None, cfg_skip_ratio=0.0, **settings):
    pipeline = WanVideoPipeline(components, teacache=teacache, cfg_skip_ratio=cfg_skip_ratio)
    return pipeline.generate(PROMPT, settings=SampleSettings(**{**SETTINGS, **settings}), progress=False)


def _cache(threshold, skip_start_steps=2):
    return TeaCache(COEFFICIENTS["wan2.1-i2v-14b-720p"], num_steps=6, threshold=threshold,
                    skip_start_steps=skip_start_steps)


def test_teacache_threshold_zero_equals_the_plain_sampler(components, plain):
    cache = _cache(0.0, skip_start_steps=0)
    assert torch.equal(_generate(components, cache), plain)
    assert len(cache.trace) == 6 and all(r["computed"] for r in cache.trace)
    assert "run_blocks" not in vars(components.dit)  # detached after the generation


def test_teacache_skips_steps_and_stays_close(components, plain):
    cache = _cache(0.3)
    cached = _generate(components, cache)
    computed = [r["computed"] for r in cache.trace]
    assert computed[:2] == [True, True] and not all(computed)
    assert not torch.equal(cached, plain)
    psnr = 10 * torch.log10(plain.pow(2).max() / (cached - plain).pow(2).mean())
    assert psnr > 20, f"TeaCache PSNR {psnr:.1f} dB"
    # the cache reset itself after the last step: a second generation is identical
    assert torch.equal(_generate(components, cache), cached)


def test_teacache_cfg_skip_makes_the_last_steps_unguided(components, plain):
    assert [cfg_skipped(i, 8, 0.25) for i in range(8)] == [False] * 6 + [True] * 2
    assert not any(cfg_skipped(i, 8, 0.0) for i in range(8))
    with pytest.raises(ValueError, match="cfg_skip_ratio"):
        cfg_skipped(0, 8, 1.0)
    # with guidance 1 the unconditional branch does not matter: skipping it changes nothing
    unguided = _generate(components, guide_scale=1.0)
    torch.testing.assert_close(_generate(components, cfg_skip_ratio=0.5, guide_scale=1.0), unguided,
                               rtol=0, atol=1e-5)
    assert not torch.allclose(_generate(components, cfg_skip_ratio=0.5), plain, atol=1e-5)


def test_teacache_coefficient_lookup_has_no_holes():
    assert teacache_coefficients("Wan2.1-Fun-V1.1-14B-Control") == COEFFICIENTS["wan2.1-i2v-14b-720p"]
    assert teacache_coefficients("models/Wan2.1_Fun_V1.1_1.3B_InP") == COEFFICIENTS["wan2.1-1.3b"]
    assert teacache_coefficients("Wan2.2-Fun-A14B-Control") == COEFFICIENTS["wan2.1-i2v-14b-720p"]
    with pytest.raises(ValueError, match="no TeaCache coefficients"):
        teacache_coefficients("my-model")
    with pytest.raises(ValueError, match="skip_start_steps"):
        TeaCache(COEFFICIENTS["wan2.1-1.3b"], num_steps=4, skip_start_steps=5)


def test_teacache_negative_polynomial_never_lowers_the_accumulator():
    # the 1.3B polynomial is negative for tiny rel (poly(0) = -0.05): such a step adds 0, so the sum
    # of earlier steps is not cancelled and threshold 0 never skips
    assert polynomial(COEFFICIENTS["wan2.1-1.3b"], 1e-4) < 0
    e0 = torch.ones(1, 1, 6, 4)
    for threshold in (0.0, 0.1):
        cache = TeaCache(COEFFICIENTS["wan2.1-1.3b"], num_steps=10, threshold=threshold, skip_start_steps=0)
        blocks = lambda x, e0: x + 1  # noqa: E731
        outputs = [cache._run_blocks(blocks, torch.zeros(1), e0 * (1 + 1e-4 * i)) for i in range(4)]
        computed = [r["computed"] for r in cache.trace]
        assert computed[0] and all(r["acc"] is None or r["acc"] == 0 for r in cache.trace)
        assert computed == ([True] * 4 if threshold == 0 else [True, False, False, False])
        assert all(torch.equal(o, torch.ones(1)) for o in outputs)


def test_teacache_is_shared_by_both_moe_experts(components):
    dit = components.dit
    moe = WanMoE(dit, WanModel(model_type="t2v", dim=32, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=32,
                               text_dim=32, text_len=32), boundary=0.9)
    cache = _cache(0.1)
    assert cache.attach(moe) is moe
    assert "run_blocks" in vars(moe.high_noise_model) and "run_blocks" in vars(moe.low_noise_model)
    other = _cache(0.2)
    other.attach(moe)  # a new cache replaces the old one, no double wrapping
    assert moe.low_noise_model.run_blocks.func.__self__ is other
    assert moe.low_noise_model.run_blocks.args[0].__func__ is WanModel.run_blocks
    TeaCache.detach(moe)
    assert "run_blocks" not in vars(moe.high_noise_model) and cache is not other
