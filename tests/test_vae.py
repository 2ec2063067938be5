"""Wan2.1 / Wan2.2 VAEs: checkpoint layout, streaming, tiling, input checks, loading, diffusers parity.

Tiny configs (a few channels, a few frames) keep the file fast; parity with the official code on
real-shaped layers is the golden cases' job (tests/golden_kinds/vae.py).
"""

import json
import re

import pytest
import torch

from conftest import state_shapes
from golden_kinds import REFERENCE_DIR
from wan.checkpoint import CheckpointError, save_state_dict
from wan.convert_vae import (VAE_CLASSES, config_from_diffusers, diffusers_config, load_vae, vae_from_diffusers,
                             vae_to_diffusers)
from wan.modules import vae_layers
from wan.modules.vae_streaming import StreamingDecoder
from wan.modules.vae_tiling import tiled_apply

pytestmark = pytest.mark.usefixtures("single_thread")



def _stats(z_dim, seed):
    g = torch.Generator().manual_seed(seed)
    return dict(latents_mean=torch.randn(z_dim, generator=g).tolist(),
                latents_std=(torch.rand(z_dim, generator=g) + 0.5).tolist())


# num_res_blocks differs between the two so that the key-table layout inference sees both.
TINY = {
    "2.1": dict(dim=8, z_dim=4, num_res_blocks=1, **_stats(4, 0)),
    "2.2": dict(dim=8, dec_dim=6, z_dim=8, dim_mult=[1, 2, 2, 2], **_stats(8, 1)),
}
MANIFESTS = {"2.1": "wan2.1_vae.json", "2.2": "wan2.2_vae.json"}


def tiny_vae(version, seed=0):
    torch.manual_seed(seed)
    return VAE_CLASSES[version](**TINY[version]).eval()


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def video(vae, latent_frames, latent_h, latent_w, seed=0):
    t, s = vae.temporal_stride, vae.spatial_stride
    return randn(1, 3, (latent_frames - 1) * t + 1, latent_h * s, latent_w * s, seed=seed).clamp(-1, 1)


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_state_dict_matches_official_manifest(version):
    manifest = json.loads((REFERENCE_DIR / "manifests" / MANIFESTS[version]).read_text())
    with torch.device("meta"):
        vae = VAE_CLASSES[version]()
    assert state_shapes(vae.state_dict()) == manifest["keys"]
    assert sum(p.numel() for p in vae.parameters()) == manifest["num_params"]
    # the latent statistics are buffers outside the checkpoint, usable after a meta-device build
    assert not any(k.startswith("latents_") for k in vae.state_dict())
    assert vae.latents_mean.device.type == "cpu" and vae.latents_std.shape == (vae.z_dim,)
    assert (vae.temporal_stride, vae.spatial_stride) == (4, {"2.1": 8, "2.2": 16}[version])


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_shapes_normalization_and_fresh_cache_per_call(version):
    vae = tiny_vae(version)
    x = video(vae, 3, 2, 3)
    with torch.no_grad():
        z = vae.encode(x)
        assert z.shape == (1, vae.z_dim, 3, 2, 3) and z.dtype == torch.float32
        out = vae.decode(z)
        assert out.shape == x.shape and out.abs().max() <= 1
        # another call in between leaves no state behind
        vae.encode(video(vae, 2, 2, 3, seed=5))
        vae.decode(randn(1, vae.z_dim, 4, 2, 3))
        assert torch.equal(vae.encode(x), z) and torch.equal(vae.decode(z), out)
        # encode/decode normalize with the configured statistics
        plain = VAE_CLASSES[version](**{**TINY[version], "latents_mean": [0.0] * vae.z_dim,
                                        "latents_std": [1.0] * vae.z_dim}).eval()
        plain.load_state_dict(vae.state_dict())
        mean, std = (torch.tensor(TINY[version][k]).view(1, -1, 1, 1, 1) for k in ("latents_mean", "latents_std"))
        torch.testing.assert_close(z, (plain.encode(x) - mean) / std, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out, plain.decode(z * std + mean), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("version", ["2.1", "2.2"])
@pytest.mark.parametrize("tiled", [False, True])
def test_streaming_decode_equals_full_decode(version, tiled):
    vae = tiny_vae(version)
    z = randn(1, vae.z_dim, 7, 6, 5, seed=1)
    tiling = dict(tiled=tiled, tile_size=4 * vae.spatial_stride, tile_overlap=2 * vae.spatial_stride)
    stream = StreamingDecoder(vae, **tiling)
    with torch.no_grad():
        full = vae.decode(z, **tiling)
        pieces = [stream.decode(chunk) for chunk in z.split(3, dim=2)]
    assert [p.shape[2] for p in pieces] == [9, 12, 4]
    torch.testing.assert_close(torch.cat(pieces, dim=2), full, atol=1e-5, rtol=1e-5)
    stream.reset()
    with torch.no_grad():
        torch.testing.assert_close(stream.decode(z), full, atol=1e-5, rtol=1e-5)


def _largest_activation(vae, fn):
    """Elements of the largest tensor any module of `vae` outputs while `fn` runs: a proxy for peak
    memory that does not depend on the allocator or on other processes."""
    largest = [0]

    def hook(module, args, output):
        if isinstance(output, torch.Tensor):
            largest[0] = max(largest[0], output.numel())

    handles = [m.register_forward_hook(hook) for m in vae.modules()]
    try:
        with torch.no_grad():
            result = fn()
    finally:
        for h in handles:
            h.remove()
    return result, largest[0]


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_frame_sliced_decode_equals_whole_chunks_with_smaller_activations(version, monkeypatch):
    vae = tiny_vae(version)
    z = randn(1, vae.z_dim, 4, 3, 4, seed=3)
    monkeypatch.setattr(vae_layers, "DECODE_SLICE_PIXELS", None)
    whole, whole_peak = _largest_activation(vae, lambda: vae.decode(z))
    monkeypatch.setattr(vae_layers, "DECODE_SLICE_PIXELS", 1)
    sliced, sliced_peak = _largest_activation(vae, lambda: vae.decode(z))
    torch.testing.assert_close(sliced, whole, atol=1e-5, rtol=1e-5)
    # each latent frame becomes 4 frames; sliced, the full-resolution layers see one at a time
    assert sliced_peak * 3 <= whole_peak


def test_rms_norm_fast_path_equals_normalize():
    norm = vae_layers.RMS_norm(6)
    torch.nn.init.normal_(norm.gamma)
    x = randn(2, 6, 3, 4, 5)
    x[0, :, 0] = 0  # all-zero positions stay zero, as F.normalize's clamp makes them
    expected = torch.nn.functional.normalize(x, dim=1) * norm.gamma * 6**0.5
    torch.testing.assert_close(norm(x), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(norm(x.double()), expected.double(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_upsample_conv_by_pixel_phases_equals_upsample_then_conv(dtype):
    torch.manual_seed(0)
    layer = vae_layers.UpsampleConv(6, 5).to(dtype)
    x = randn(2, 6, 3, 7, 9).to(dtype)
    out = layer(x)
    assert out.shape == (2, 5, 3, 14, 18)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out, torch.nn.Sequential.forward(layer, x), **tolerance)


def test_causal_conv_first_frame_skips_the_zero_padding_and_continues_exactly():
    torch.manual_seed(0)
    conv = vae_layers.CausalConv3d(4, 6, 3, padding=1)
    frames = randn(1, 4, 5, 6, 7)
    padded = torch.nn.functional.pad(frames, (0, 0, 0, 0, 2, 0))
    expected = torch.nn.functional.conv3d(padded, conv.weight, conv.bias, padding=(0, 1, 1))
    cache = {}
    first = conv(frames[:, :, :1], cache)
    torch.testing.assert_close(cache[conv], padded[:, :, 1:3])
    rest = conv(frames[:, :, 1:], cache)
    torch.testing.assert_close(torch.cat([first, rest], dim=2), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(conv(frames), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_conv3d_kernel_choices_and_output_channel_groups_equal_conv3d(bias, monkeypatch):
    weight, b = randn(40, 6, 3, 3, 3, seed=1), randn(40, seed=2) if bias else None
    monkeypatch.setattr(vae_layers, "ONEDNN_WEIGHT_GROUP_ELEMENTS", 16 * 6 * 27)  # groups of 16 channels
    for x in (randn(1, 6, 3, 4, 5), randn(1, 6, 3, 1, 1)):  # oneDNN in 3 groups; im2col (fewer positions)
        expected = torch.nn.functional.conv3d(x, weight, b, 1, (0, 1, 1))
        torch.testing.assert_close(vae_layers.conv3d(x, weight, b, 1, (0, 1, 1)), expected, atol=1e-5, rtol=1e-5)


def test_tile_blending_is_a_partition_of_unity():
    x = randn(1, 2, 3, 20, 27)
    upsample = torch.nn.Upsample(scale_factor=(1, 4, 4))
    for tile, overlap in (((8, 8), (2, 2)), ((6, 10), (4, 3)), ((20, 5), (0, 1))):
        torch.testing.assert_close(tiled_apply(lambda t, key: upsample(t) * 2, x, tile, overlap, 1, 4),
                                   upsample(x) * 2)


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_tiling_approximates_whole_frames_with_less_memory(version, monkeypatch):
    monkeypatch.setattr(vae_layers, "DECODE_SLICE_PIXELS", None)  # tiling alone bounds the activations here
    vae = tiny_vae(version)
    s = vae.spatial_stride
    tiles = dict(tiled=True, tile_size=(10 * s, 10 * s), tile_overlap=(4 * s, 4 * s))
    x = video(vae, 2, 16, 20, seed=2)
    z, z_peak = _largest_activation(vae, lambda: vae.encode(x))
    z_tiled, z_tiled_peak = _largest_activation(vae, lambda: vae.encode(x, **tiles))
    out, out_peak = _largest_activation(vae, lambda: vae.decode(z))
    out_tiled, out_tiled_peak = _largest_activation(vae, lambda: vae.decode(z, **tiles))
    assert z_tiled.shape == z.shape and out_tiled.shape == out.shape
    # Tiles see zero padding where the whole frame has neighbours, and a random tiny decoder has a
    # wide receptive field; the blend still keeps the error to a few percent.
    assert (z_tiled - z).abs().mean() < 0.05 * z.abs().mean()
    assert (out_tiled - out).abs().mean() < 0.1 * out.abs().mean()
    # a 10x10 tile of a 16x20 grid
    assert z_tiled_peak < 0.4 * z_peak and out_tiled_peak < 0.4 * out_peak


def test_bad_input_errors_say_what_to_do():
    vae = tiny_vae("2.1")
    cases = [
        (lambda: vae.encode(randn(3, 9, 32, 32)), r"5D .*unsqueeze\(0\)"),
        (lambda: vae.encode(randn(1, 4, 9, 32, 32)), r"3 \(RGB\) channels"),
        (lambda: vae.encode(randn(1, 3, 8, 32, 32)), r"8 frames.*4n\+1.*trim to 5 or pad to 9"),
        (lambda: vae.encode(randn(1, 3, 9, 30, 32)), r"30x32 is not divisible by the spatial stride 8"),
        (lambda: vae.decode(randn(1, 16, 3, 4, 4)), r"16 channels but this VAE has z_dim 4"),
        (lambda: vae.decode(randn(4, 3, 4, 4)), r"latents must be 5D"),
        (lambda: vae.decode(randn(1, 4, 3, 4, 4), tiled=True, tile_size=60), r"multiples of the VAE's spatial"),
        (lambda: vae.decode(randn(1, 4, 3, 4, 4), tiled=True, tile_size=64, tile_overlap=64),
         r"tile_overlap=\(64, 64\) must be smaller"),
        (lambda: VAE_CLASSES["2.1"](z_dim=4), r"16/16 values but z_dim is 4"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_diffusers_round_trip(version):
    diffusers = pytest.importorskip("diffusers")
    vae = tiny_vae(version)
    state = vae.state_dict()
    theirs = diffusers.AutoencoderKLWan(**diffusers_config(version, **TINY[version])).eval()
    theirs.load_state_dict(vae_to_diffusers(state), strict=True)
    back = vae_from_diffusers(theirs.state_dict())
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    version_back, config = config_from_diffusers(theirs.config)
    with torch.device("meta"):
        rebuilt = VAE_CLASSES[version_back](**config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in state.items()}
    assert torch.equal(rebuilt.latents_mean, vae.latents_mean) and torch.equal(rebuilt.latents_std, vae.latents_std)
    x = video(vae, 3, 2, 3)
    mean, std = (getattr(vae, k).view(1, -1, 1, 1, 1) for k in ("latents_mean", "latents_std"))
    with torch.no_grad():
        z = vae.encode(x)
        torch.testing.assert_close(z * std + mean, theirs.encode(x).latent_dist.mode(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(vae.decode(z), theirs.decode(z * std + mean).sample, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_load_vae_official_and_diffusers_files(version, tmp_path):
    vae = tiny_vae(version)
    z = randn(1, vae.z_dim, 2, 2, 2)
    with torch.no_grad():
        expected = vae.decode(z)
    torch.save(vae.state_dict(), tmp_path / "official.pth")
    save_state_dict(vae_to_diffusers(vae.state_dict()), tmp_path / "diffusers.safetensors")
    for name in ("official.pth", "diffusers.safetensors"):
        loaded = load_vae(tmp_path / name, version, **TINY[version])
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        with torch.no_grad():
            torch.testing.assert_close(loaded.decode(z), expected, atol=0, rtol=0)
    bf16 = load_vae(tmp_path / "official.pth", version, dtype=torch.bfloat16, **TINY[version])
    with torch.no_grad():
        assert bf16.decode(z).dtype == torch.float32 and bf16.encode(video(vae, 2, 1, 1)).dtype == torch.float32
    other = "2.2" if version == "2.1" else "2.1"
    with pytest.raises(CheckpointError, match=re.escape("does not match")):
        load_vae(tmp_path / "official.pth", other, **TINY[other])
    with pytest.raises(ValueError, match="unknown VAE version"):
        load_vae(tmp_path / "official.pth", "3.0")
