"""StableAvatar model: checkpoint layout and the audio branch's invariants."""

import json

import pytest
import torch

from conftest import randomize, state_shapes
from golden_kinds import EXT_DIR, case_kind, golden_cases, load_case, load_runners
from wan.modules.model import WanModel
from wan.modules.stableavatar import STABLEAVATAR_1_3B, StableAvatarModel
from wan.modules.vocal_projector import VocalProjector, audio_window_ranges, audio_windows, frame_block_mask

MANIFESTS = EXT_DIR / "stableavatar" / "manifests"
TINY = dict(dim=64, ffn_dim=128, num_heads=4, num_layers=2, freq_dim=32, text_dim=32, text_len=16, clip_dim=32,
            in_dim=36, vocal_projector=dict(audio_in_dim=24, num_heads=4))


def test_avatar_transformer_matches_release_manifest():
    with torch.device("meta"):
        model = StableAvatarModel(**STABLEAVATAR_1_3B)
    manifest = json.loads((MANIFESTS / "stableavatar_transformer_1.3B.json").read_text())
    assert state_shapes(model.state_dict()) == manifest["keys"]
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]
    base = json.loads((MANIFESTS / "wan2.1_fun_1.3B_inp.json").read_text())["keys"]
    assert len(set(manifest["keys"]) - set(base)) == 160  # the audio keys over the Fun-InP base


def test_avatar_vocal_projector_matches_release_manifest():
    with torch.device("meta"):
        model = VocalProjector(audio_in_dim=768, audio_proj_dim=1536, dit_dim=1536)
    manifest = json.loads((MANIFESTS / "stableavatar_vocal_projector_1.3B.json").read_text())
    assert state_shapes(model.state_dict()) == manifest["keys"]
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]


def inputs(batch=2, frames=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(batch, 16, frames, 4, 6, generator=g), t=torch.tensor([900.0, 300.0][:batch]),
                context=torch.randn(batch, 5, 32, generator=g), y=torch.randn(batch, 20, frames, 4, 6, generator=g),
                clip_fea=torch.randn(batch, 257, 32, generator=g), audio=torch.randn(batch, 30, 24, generator=g))


def test_avatar_zero_audio_branch_is_the_base_i2v_model():
    """With k_vocal/v_vocal at their zero init the model is Wan2.1 i2v, whatever the audio."""
    model = randomize(StableAvatarModel(**TINY))
    for block in model.blocks:
        torch.nn.init.zeros_(block.cross_attn.k_vocal.weight), torch.nn.init.zeros_(block.cross_attn.k_vocal.bias)
        torch.nn.init.zeros_(block.cross_attn.v_vocal.weight), torch.nn.init.zeros_(block.cross_attn.v_vocal.bias)
    base = WanModel(**{k: v for k, v in TINY.items() if k != "vocal_projector"}, model_type="i2v")
    missing = base.load_state_dict(model.state_dict(), strict=False).unexpected_keys
    assert len(missing) == 4 * len(model.blocks) + len(list(model.vocal_projector.state_dict()))
    a = inputs()
    with torch.no_grad():
        ours = model(a["x"], a["t"], a["context"], y=a["y"], clip_fea=a["clip_fea"], audio=a["audio"])
        expected = base(a["x"], a["t"], a["context"], y=a["y"], clip_fea=a["clip_fea"])
    assert torch.allclose(ours, expected, atol=1e-5)


def test_avatar_no_audio_rows_and_frame_mask():
    """A row without audio ignores its audio input; the frame mask is block-diagonal."""
    model = randomize(StableAvatarModel(**TINY)).eval()
    a = inputs(batch=1, frames=3)
    with torch.no_grad():
        out = model(a["x"], a["t"], a["context"], y=a["y"], clip_fea=a["clip_fea"], audio=a["audio"],
                    audio_mask=torch.tensor([False]))
        other = model(a["x"], a["t"], a["context"], y=a["y"], clip_fea=a["clip_fea"],
                      audio=torch.randn_like(a["audio"]), audio_mask=torch.tensor([False]))
        with_audio = model(a["x"], a["t"], a["context"], y=a["y"], clip_fea=a["clip_fea"], audio=a["audio"])
    assert torch.equal(out, other)
    assert not torch.allclose(out, with_audio, atol=1e-4)
    mask = frame_block_mask(12, 3, 2)
    assert mask.shape == (12, 6) and mask[:4, :2].all() and not mask[:4, 2:].any() and mask[8:, 4:].all()


def test_avatar_audio_windows_drop_rows_outside_and_pad_at_the_end():
    tokens = torch.arange(1, 11, dtype=torch.float32)[None, :, None]  # rows 1..10
    windows, lengths = audio_windows(tokens, [[-6, -2], [-2, 2], [8, 12]])
    assert lengths.tolist() == [0, 3, 2]
    assert windows[0, :, :, 0].tolist() == [[0] * 5, [1, 2, 3, 0, 0], [9, 10, 0, 0, 0]]
    # 81 frames, 167 tokens (84 frames of audio): 21 windows of 17 rows, the released ranges
    ranges = audio_window_ranges(167, 81)
    assert len(ranges) == 21 and ranges[0] == [-11, 5] and ranges[1] == [-3, 13] and ranges[-1] == [153, 169]
    assert {end - start + 1 for start, end in ranges} == {17}
    assert audio_window_ranges(3, 1) and len(audio_window_ranges(10, 1)) == 1  # a one-frame clip has one window


# test_golden.py runs every case under its file name; those whose names do not say "avatar" (the
# projector's and wav2vec2's) also run here, so that `pytest -k "audio or avatar"` selects them all.
STABLEAVATAR_KINDS = ("stableavatar_transformer", "vocal_projector", "wav2vec_features", "stableavatar_long_pipeline")
RUNNERS = load_runners()  # importing the runners claims their extension cases
UNNAMED_CASES = [p for p in golden_cases() if case_kind(p) in STABLEAVATAR_KINDS and "avatar" not in p.stem]


@pytest.mark.parametrize("path", UNNAMED_CASES, ids=[p.stem for p in UNNAMED_CASES])
def test_avatar_golden(path):
    case = load_case(path)
    RUNNERS[case.kind](case)
