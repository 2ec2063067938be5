"""StableAvatar long-video pipeline: window plan, blending, and `inference.py --task avatar` end to end."""

import json
import math

import pytest
import torch

import inference
from pipelines.extensions.stableavatar import make_tiny
from pipelines.stableavatar import (AvatarSettings, StableAvatarPipeline, latent_frames_for, overlap_weights,
                                    plan_windows)
from pipelines.validation import InvalidInput
from wan.audio import load_audio, probe_streams, save_wav

from conftest import mp4_fps, mp4_frames, run_inference_main

IMAGE = inference.Path(inference.__file__).parent / "prompts" / "images" / "first_frame.png"


@pytest.fixture(scope="module")
def tiny_avatar(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("avatar") / "tiny", seed=3)


def speech(num_samples, seed=0):
    """A voiced-like test waveform: a few harmonics with a syllable-rate envelope."""
    t = torch.arange(num_samples) / 16000
    wave = sum(torch.sin(2 * math.pi * f * t) / (k + 1) for k, f in enumerate((140, 280, 420, 700)))
    noise = 0.05 * torch.randn(num_samples, generator=torch.Generator().manual_seed(seed))
    return 0.3 * (wave * (0.6 + 0.4 * torch.sin(2 * math.pi * 4 * t)) + noise)


def test_avatar_window_plan_covers_every_length():
    # released plan: shorter padded last window; ours: whole windows moved back to the end
    assert plan_windows(12, 9, 3, reference=True) == [(0, 9), (6, 12)]
    assert plan_windows(12, 9, 3) == [(0, 9), (3, 12)]
    assert plan_windows(21, 21, 5) == [(0, 21)]  # exactly one clip: the released loop never ended
    assert plan_windows(7, 21, 5) == [(0, 7)]     # shorter than a clip: the released loop ran no window
    for length in range(1, 60):
        windows = plan_windows(length, 21, 5)
        covered = torch.zeros(length, dtype=torch.bool)
        for start, end in windows:
            covered[start:end] = True
            assert end - start == min(21, length)
        assert covered.all() and windows[-1][1] == length
        assert all(b[0] - a[0] <= 16 for a, b in zip(windows, windows[1:]))  # overlap at least 5


def test_avatar_overlap_weights():
    assert torch.allclose(overlap_weights(3, "uniform"), torch.tensor([0.0, 0.5, 1.0]))
    log = overlap_weights(5, "log")
    assert log[0] == 0 and abs(log[-1] - 1) < 1e-6 and (log[1:] > overlap_weights(5, "uniform")[1:] - 1e-6).all()
    with pytest.raises(InvalidInput, match="overlap"):
        AvatarSettings(overlap=1).check()
    with pytest.raises(InvalidInput, match="40 ms"):
        latent_frames_for(639)
    assert latent_frames_for(8000) == (12, 4)  # 0.5 s: 12 frames, decoded 13 then cut to 12


class SpyDiT(torch.nn.Module):
    """Stands in for the DiT: records the windows it sees, predicts a fixed function of x."""

    patch_size = (1, 2, 2)

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, context, *, y, clip_fea, audio, audio_mask, num_frames, seq_len):
        self.calls.append((x.shape[2], y.shape[2], num_frames, seq_len, audio.shape[1]))
        return 0.1 * x + audio.mean() * torch.tensor([0.0, 1.0, 2.0])[:, None, None, None, None]


class ConstantAudio:
    def last_hidden_state(self, audio):
        return torch.full((1, len(audio) // 320, 4), float(audio.abs().mean()))


def test_avatar_last_window_has_no_padding():
    dit = SpyDiT()
    pipeline = StableAvatarPipeline(dit, None, None, None, ConstantAudio(), negative_prompt="")
    settings = AvatarSettings(clip_frames=17, overlap=2, sample_steps=2)
    noise = torch.randn(1, 16, 12, 4, 4)
    out = pipeline.denoise(noise, speech(27200), torch.zeros(3, 8), torch.zeros(3, 8), torch.zeros(1, 20, 5, 4, 4),
                           torch.zeros(1, 5, 8), settings, progress=False)
    assert out.shape == noise.shape and out.abs().sum() > 0
    assert {call[:4] for call in dit.calls} == {(5, 5, None, None)}  # whole windows, no token padding
    assert {call[4] for call in dit.calls} == {5 * 4 * 640 // 320}    # each window's own 20 frames of audio
    dit.calls.clear()
    pipeline.denoise(noise, speech(27200), torch.zeros(3, 8), torch.zeros(3, 8), torch.zeros(1, 20, 5, 4, 4),
                     torch.zeros(1, 5, 8), settings, reference_windows=True, progress=False)
    assert (3, 3, 17, 5 * 4) in {call[:4] for call in dit.calls}  # the released padded last window, for parity


def test_avatar_inference_any_audio_length(tiny_avatar, tmp_path):
    """0.5 s (shorter than a clip), exactly one clip (17 frames) and 2.5 clips: an mp4 of the audio's
    length with the audio track, in one inference.py run."""
    lengths = {"short": 8000, "one_window": 17 * 640, "two_and_a_half": int(2.5 * 17 * 640)}
    lines = []
    for name, samples in lengths.items():
        save_wav(tmp_path / f"{name}.wav", speech(samples))
        lines.append(f"{IMAGE}\t{name}.wav\tA person is talking about {name}.")
    (tmp_path / "prompts.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    code = run_inference_main("--task", "avatar", "--checkpoint_dir", tiny_avatar, "--data_path",
                              tmp_path / "prompts.txt", "--output_folder", out, "--seed", 5)
    assert code == 0
    videos = sorted(out.glob("*.mp4"))
    assert len(videos) == 3
    for video, (name, samples) in zip(videos, lengths.items()):
        assert video.name.startswith(f"{list(lengths).index(name):03d}_")
        frames = mp4_frames(video)
        assert mp4_fps(video) == 25 and len(frames) == samples // 640, (name, len(frames))
        assert probe_streams(video) == ["Video", "Audio"]
        audio = load_audio(video)
        assert abs(len(audio) - len(frames) * 640) < 1600
        pixels = torch.tensor(frames[-1]).float()
        assert pixels.std() > 1  # not a blank frame
        sidecar = json.loads(video.with_suffix(".json").read_text())
        assert sidecar["frames"] == len(frames) and sidecar["clip_frames"] == 17 and sidecar["size"] == "32*32"
