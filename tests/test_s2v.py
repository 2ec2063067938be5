"""Wan2.2 S2V-14B: the released key set, model behaviour and the audio-driven clip-chaining pipeline."""

import json

import pytest
import torch

from conftest import mp4_frames, randomize, run_inference_main, state_shapes
from golden_kinds import EXT_DIR
from wan.modules.s2v import WanS2VModel, s2v_config

MANIFESTS = EXT_DIR / "variants" / "manifests"


def test_s2v_state_dict_matches_official_manifest():
    manifest = json.loads((MANIFESTS / "wan2.2_s2v_14B.json").read_text())
    with torch.device("meta"):
        model = WanS2VModel.from_config(s2v_config())
    assert state_shapes(model.state_dict()) == manifest["keys"]
    assert sum(v.numel() for v in model.state_dict().values()) == manifest["num_params"]


def test_s2v_rejects_unreleased_configurations():
    with pytest.raises(ValueError, match="enable_motioner"):
        WanS2VModel.from_config(s2v_config(enable_motioner=True, num_layers=1, dim=32, num_heads=2))
    with pytest.raises(ValueError, match="outside the 2 blocks"):
        WanS2VModel.from_config(s2v_config(audio_inject_layers=[0, 5], num_layers=2, dim=32, num_heads=2))


def _tiny_s2v(seed=0):
    config = s2v_config(dim=32, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=32, text_dim=16, text_len=8,
                        audio_dim=8, audio_inject_layers=(1,))
    return randomize(WanS2VModel.from_config(config), std=0.2, seed=seed).eval()


def test_s2v_no_pose_equals_zero_pose_latents_and_audio_matters():
    model = _tiny_s2v()
    g = torch.Generator().manual_seed(0)
    x, ref = torch.randn(1, 16, 2, 8, 8, generator=g), torch.randn(1, 16, 1, 8, 8, generator=g)
    audio, context = torch.randn(1, 25, 8, 8, generator=g), torch.randn(1, 5, 16, generator=g)
    motion = torch.randn(1, 16, 19, 8, 8, generator=g)
    t = torch.tensor([600.0])
    with torch.no_grad():
        out = model(x, t, context, ref_latents=ref, audio=audio, motion_latents=motion)
        zero_pose = model(x, t, context, ref_latents=ref, audio=audio, motion_latents=motion,
                          cond=torch.zeros(1, 16, 2, 8, 8))
        silent = model(x, t, context, ref_latents=ref, audio=0 * audio, motion_latents=motion)
        no_motion = model(x, t, context, ref_latents=ref, audio=audio, drop_motion=True)
        pose = model(x, t, context, ref_latents=ref, audio=audio, motion_latents=motion,
                     cond=torch.randn(1, 16, 2, 8, 8, generator=g))
    assert (out - zero_pose).abs().max() < 1e-5 and (out - pose).abs().max() > 1e-2
    assert (out - silent).abs().max() > 1e-2 and (out - no_motion).abs().max() > 1e-2
    with pytest.raises(ValueError, match="4 audio frames per latent frame"):
        model(x, t, context, ref_latents=ref, audio=audio[..., :6], motion_latents=motion)


def test_s2v_framepack_tokens_and_positions():
    """FramePack (FACTS 3.2): the last 19 motion latents, zero-padded in front, as newest 1 | 2x | 4x
    tokens at RoPE times -1 | -3 | -19, -14, -9, -4, rows and columns spread over the full token grid."""
    from wan.modules.s2v_framepack import FramePackMotioner

    packer = FramePackMotioner(dim=8)
    tokens, positions = packer(torch.randn(1, 16, 7, 8, 16))  # 7 motion latents of 8x16: 4x8 tokens a frame
    assert tokens.shape == (1, 32 + 8 + 8, 8) and positions.shape == (48, 3)
    assert positions[:32].tolist() == [[-1, r, c] for r in range(4) for c in range(8)]
    assert positions[32:40].tolist() == [[-3, r, c] for r in (0, 3) for c in (0, 2, 4, 7)]
    assert positions[40:].tolist() == [[t, 0, c] for t in (-19, -14, -9, -4) for c in (0, 7)]
    # the 4x bucket's first 12 of 16 frames are padding: those tokens are the convolution's bias
    assert torch.allclose(tokens[0, 40:46], packer.proj_4x.bias.expand(6, -1), atol=1e-6)
    assert not torch.allclose(tokens[0, 46:], packer.proj_4x.bias.expand(2, -1), atol=1e-3)


def test_s2v_audio_features_per_frame_follow_the_official_sampling():
    """50 Hz -> 30 Hz (linear, align_corners), then frame i at 16 fps takes the 30 Hz feature
    numpy-round(i * 1.875) (halves to even: frame 12 -> 22), zeros past the audio."""
    from pipelines.s2v_features import features_per_frame, to_feature_rate

    hidden = torch.arange(100.0)[None, :, None].expand(2, 100, 3)  # 2 s at 50 Hz, value = 50 Hz index
    at_30 = to_feature_rate(hidden)
    assert at_30.shape == (2, 60, 3) and torch.allclose(at_30[0, :, 0], torch.linspace(0, 99, 60))
    frames = features_per_frame(torch.arange(60.0)[None, :, None], 40)  # value = 30 Hz index
    assert frames.shape == (1, 1, 40)
    assert frames[0, 0, :13].tolist() == [0, 2, 4, 6, 8, 9, 11, 13, 15, 17, 19, 21, 22]
    assert frames[0, 0, 31] == 58 and (frames[0, 0, 32:] == 0).all()  # round(32 * 1.875) = 60: past the end


def test_s2v_clip_plan_covers_the_audio():
    from pipelines.s2v import clip_plan, video_size

    # the first clip gives 3 frames fewer (decoded behind the reference latent)
    assert [clip_plan(n, 80) for n in (1, 77, 78, 157, 158)] == [1, 1, 2, 2, 3]
    assert video_size(720, 1280, 1280 * 720) == (704, 1280)   # sides in multiples of 64, area <= max
    assert video_size(100, 80, 1280 * 720) == (128, 128)       # small images are not upscaled before rounding


def test_s2v_rejects_audio_shorter_than_a_frame_and_bad_clip_lengths():
    from pipelines.s2v import S2VPipeline
    from pipelines.validation import InvalidInput

    pipeline = S2VPipeline(dit=None, vae=None, text_encoder=None, audio_encoder=None)
    with pytest.raises(InvalidInput, match="less than one video frame"):
        next(pipeline.generate("a person talking", torch.zeros(3, 64, 64), torch.zeros(999)))
    with pytest.raises(InvalidInput, match="multiple of 4"):
        pipeline.settings(frame_num=81)
    with pytest.raises(InvalidInput, match="supported maximum areas"):
        pipeline.settings(size="64*64")
    with pytest.raises(InvalidInput, match="one guidance scale"):
        pipeline.settings(guide_scale=(3.0, 4.0))


# -- tiny end to end ----------------------------------------------------------------------------

def tone(seconds, rate=16000):
    t = torch.arange(int(round(seconds * rate))) / rate
    return 0.5 * torch.sin(2 * torch.pi * 220 * t) * torch.sin(2 * torch.pi * 3 * t)


@pytest.fixture(scope="module")
def tiny_s2v_folder(tmp_path_factory):
    from pipelines.extensions.s2v import make_tiny

    return make_tiny(tmp_path_factory.mktemp("s2v") / "ckpt", seed=0)


def test_s2v_inference_any_audio_length_gives_video_of_that_length_with_sound(tiny_s2v_folder, tmp_path,
                                                                           monkeypatch):
    """0.5 s of audio (one clip) and 1.2 s (two clips): mp4s of 8 and 19 frames at 16 fps with the audio
    muxed in. Clip 0 has no motion tokens; clip 1 gets the VAE latents of the 73-frame buffer ending in
    clip 0's frames; the audio windows are consecutive and shifted so that video frame k gets audio frame k."""
    import numpy as np
    from PIL import Image

    from pipelines.s2v import FIRST_CLIP_DROP, S2VPipeline
    from pipelines.s2v_features import features_per_frame, to_feature_rate
    from wan.audio import load_audio, probe_streams, save_wav
    from wan.modules.s2v import MOTION_FRAMES

    calls, encodes, clips, features = [], [], [], []
    forward, encode, generate = WanS2VModel.forward, S2VPipeline._encode, S2VPipeline.generate

    def recording_forward(self, *args, **kwargs):
        calls.append(kwargs)
        return forward(self, *args, **kwargs)

    def recording_encode(self, video):
        encodes.append((video, encode(self, video)))
        return encodes[-1][1]

    def recording_generate(self, prompt, image, waveform, *args, **kwargs):
        features.append(to_feature_rate(self.audio_encoder(waveform)))
        for clip in generate(self, prompt, image, waveform, *args, **kwargs):
            clips.append(clip)
            yield clip

    monkeypatch.setattr(WanS2VModel, "forward", recording_forward)
    monkeypatch.setattr(S2VPipeline, "_encode", recording_encode)
    monkeypatch.setattr(S2VPipeline, "generate", recording_generate)

    Image.fromarray((np.random.RandomState(0).rand(80, 64, 3) * 255).astype(np.uint8)).save(tmp_path / "face.png")
    save_wav(tmp_path / "short.wav", tone(0.5))
    save_wav(tmp_path / "long.wav", tone(1.2))
    (tmp_path / "prompts.txt").write_text("face.png\tshort.wav\ta cat talking\nface.png\tlong.wav\ta dog singing\n")
    out = tmp_path / "out"
    assert run_inference_main("--task", "s2v", "--checkpoint_dir", tiny_s2v_folder, "--data_path",
                              tmp_path / "prompts.txt", "--output_folder", out) == 0
    for stem, frames in (("000_a_cat_talking", 8), ("001_a_dog_singing", 19)):
        sidecar = json.loads((out / f"{stem}.json").read_text())
        assert (sidecar["frames"], sidecar["fps"], sidecar["height"], sidecar["width"]) == (frames, 16, 64, 64)
        assert probe_streams(out / f"{stem}.mp4") == ["Video", "Audio"]
        assert len(mp4_frames(out / f"{stem}.mp4")) == frames
        assert abs(len(load_audio(out / f"{stem}.mp4")) - frames * 1000) < 1200  # 1000 samples per frame

    # tiny folder: 12 frames per clip, 2 steps; clip 0 gives 9 frames, so 1.2 s (19 frames) takes 2 clips
    assert [c.shape[1] for c in clips] == [8, 9, 10]
    # 2 steps x (conditional, unconditional) per clip; clips: short 0 | long 0 | long 1
    assert [c["drop_motion"] for c in calls] == [True] * 8 + [False] * 4
    assert all(c["motion_latents"] is None for c in calls[:8])
    buffer, motion_latents = encodes[-1]  # the buffer encoded after clip 0 of the long audio
    assert torch.equal(buffer, torch.cat([torch.zeros(3, MOTION_FRAMES - 9, 64, 64), clips[1]], dim=1))
    assert all(c["motion_latents"] is motion_latents for c in calls[8:])

    assert all((c["audio"] == 0).all() for c in calls[1::2])  # the unconditional passes: silence
    long_calls = calls[4:]
    windows = torch.cat([long_calls[0]["audio"], long_calls[4]["audio"]], dim=-1)
    assert (windows[..., :FIRST_CLIP_DROP] == 0).all()
    assert torch.equal(windows[0, ..., FIRST_CLIP_DROP:], features_per_frame(features[1], 24 - FIRST_CLIP_DROP))


def test_s2v_pose_video_latents_per_clip(monkeypatch):
    """Pose frames of each clip (missing ones -1), the chunk's first frame prepended before VAE encoding
    and its latent dropped, as upstream."""
    from pipelines.s2v import S2VPipeline

    pipeline = S2VPipeline(dit=None, vae=None, text_encoder=None, audio_encoder=None)
    encoded = []
    monkeypatch.setattr(S2VPipeline, "_encode",
                        lambda self, video: encoded.append(video) or torch.zeros(1, 16, 4, 8, 8))
    pose = torch.rand(3, 5, 64, 64) * 2 - 1
    for clip in (0, 1):
        assert pipeline._pose_latents(pose, clip, 12, 64, 64).shape == (1, 16, 3, 8, 8)
    first, second = encoded
    # chunk 0: its first frame again, then the first pose frame for the 3 lead-in frames, the pose, -1
    assert first.shape == (3, 13, 64, 64) and torch.allclose(first[:, 4:9], pose, atol=1e-6)
    assert all(torch.equal(first[:, i], first[:, 4]) for i in range(4)) and (first[:, 9:] == -1).all()
    assert (second == -1).all()  # the pose video ended before clip 1
