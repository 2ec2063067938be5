"""Audio front end: ffmpeg decoding and muxing, wav2vec2 features from local folders."""

import math
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipelines.video_io import save_video
from wan.audio import AudioError, Wav2Vec2Features, load_audio, mux_audio, probe_streams, save_wav
from wan.audio.decode import ffmpeg_exe
from wan.audio.tiny import make_tiny_wav2vec2


def tone(freq, seconds, rate=16000, amplitude=0.5):
    t = torch.arange(int(seconds * rate)) / rate
    return amplitude * torch.sin(2 * math.pi * freq * t)


def dominant_frequency(waveform, rate=16000):
    spectrum = torch.fft.rfft(waveform.double()).abs()
    return spectrum.argmax().item() * rate / len(waveform)


@pytest.fixture(scope="module")
def wav2vec_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("wav2vec")
    return {layout: make_tiny_wav2vec2(root / layout, layout, seed=1) for layout in ("base", "large")}


def test_audio_wav_round_trip(tmp_path):
    waveform = tone(440, 1.0)
    decoded = load_audio(save_wav(tmp_path / "a.wav", waveform))
    assert decoded.dtype == torch.float32 and decoded.shape == waveform.shape
    assert (decoded - waveform).abs().max() < 1e-4  # 16-bit quantisation


@pytest.mark.parametrize("ext", ["mp3", "m4a", "mp4"])
def test_audio_decode_resamples_and_downmixes(tmp_path, ext):
    """44.1 kHz stereo (a 300 Hz tone left, silence right) -> 16 kHz mono at half amplitude."""
    path = tmp_path / f"a.{ext}"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i",
                    "sine=frequency=300:duration=1:sample_rate=44100",
                    "-f", "lavfi", "-i", "anullsrc=r=44100:cl=mono", "-filter_complex", "[0:a][1:a]amerge=inputs=2",
                    "-t", "1", "-c:a", "aac" if ext != "mp3" else "libmp3lame", str(path)], check=True)
    decoded = load_audio(path)
    assert abs(len(decoded) - 16000) < 1600  # codec priming / padding only
    assert abs(dominant_frequency(decoded) - 300) < 3
    middle = decoded[4000:12000]
    assert abs(middle.abs().max().item() - 0.125 / 2) < 0.01  # lavfi sine amplitude 1/8, averaged with silence


def test_audio_missing_stream_and_file_errors(tmp_path):
    save_video(torch.zeros(3, 5, 32, 32), tmp_path / "silent.mp4", fps=25)
    with pytest.raises(AudioError, match="no audio stream"):
        load_audio(tmp_path / "silent.mp4")
    with pytest.raises(AudioError, match="not found"):
        load_audio(tmp_path / "nothing.wav")


def test_audio_mux_adds_track(tmp_path):
    save_video(torch.zeros(3, 25, 32, 32), tmp_path / "v.mp4", fps=25)
    assert probe_streams(tmp_path / "v.mp4") == ["Video"]
    mux_audio(tmp_path / "v.mp4", save_wav(tmp_path / "a.wav", tone(440, 2.0)))
    assert probe_streams(tmp_path / "v.mp4") == ["Video", "Audio"]
    audio = load_audio(tmp_path / "v.mp4")
    assert abs(len(audio) - 16000) < 1200  # cut to the 1 s video
    assert abs(dominant_frequency(audio) - 440) < 3


def test_audio_wav2vec_normalises_each_call(wav2vec_folders):
    encoder = Wav2Vec2Features.from_folder(wav2vec_folders["base"])
    waveform = tone(200, 0.5) + 0.3
    values = encoder.input_values(waveform)[0]
    assert abs(values.mean().item()) < 1e-5 and abs(values.std(unbiased=False).item() - 1) < 1e-4
    # the features of a slice depend on the slice alone (normalised over it), scale included
    assert torch.allclose(encoder.last_hidden_state(waveform * 3), encoder.last_hidden_state(waveform), atol=1e-4)
    assert encoder.last_hidden_state(waveform).shape == (1, 8000 // 320 - 1, 32)
    with pytest.raises(ValueError, match="at least 400 samples"):
        encoder.last_hidden_state(torch.zeros(399))


@pytest.mark.parametrize("layout", ["base", "large"])
def test_audio_wav2vec_all_hidden_states_are_transformers4(wav2vec_folders, layout):
    """The 4.x hidden states: each layer's input, then the encoder output (after the pre-LN model's
    final LayerNorm, which transformers 5 leaves out of `hidden_states[-1]`)."""
    encoder = Wav2Vec2Features.from_folder(wav2vec_folders[layout])
    waveform = tone(150, 0.4) + 0.1 * torch.randn(6400, generator=torch.Generator().manual_seed(0))
    states = encoder.all_hidden_states(waveform)
    assert states.shape == (3, 19, 32)
    model = encoder.model
    with torch.no_grad():
        hidden, _ = model.feature_projection(model.feature_extractor(encoder.input_values(waveform)).transpose(1, 2))
        hidden = hidden + model.encoder.pos_conv_embed(hidden)
        if layout == "base":
            hidden = model.encoder.layer_norm(hidden)
        expected = [hidden]
        for layer in model.encoder.layers:
            hidden = layer(hidden)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            expected.append(hidden)
        if layout == "large":
            expected[-1] = model.encoder.layer_norm(hidden)
    assert torch.allclose(states, torch.cat(expected), atol=1e-5)
    assert torch.allclose(states[-1:], encoder.last_hidden_state(waveform), atol=1e-6)


def test_audio_wav2vec_loads_legacy_weight_norm_names(wav2vec_folders, tmp_path):
    """Hub checkpoints name the positional conv's weight norm weight_g / weight_v."""
    folder = make_tiny_wav2vec2(tmp_path / "legacy", "base", seed=1)
    state = load_file(folder / "model.safetensors")
    renamed = {k.replace("parametrizations.weight.original0", "weight_g")
                .replace("parametrizations.weight.original1", "weight_v"): v for k, v in state.items()}
    assert renamed.keys() != state.keys()
    save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})
    waveform = tone(300, 0.3)
    legacy = Wav2Vec2Features.from_folder(folder).last_hidden_state(waveform)
    current = Wav2Vec2Features.from_folder(wav2vec_folders["base"]).last_hidden_state(waveform)
    assert torch.equal(legacy, current)


def test_audio_wav2vec_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Wav2Vec2Features.from_folder(tmp_path)


@pytest.mark.parametrize("manifest_path,head,layout", [
    ("stableavatar/manifests/wav2vec2_base_960h.json", False, "base"),
    ("variants/manifests/wav2vec2_large_xlsr_53_english.json", True, "large"),
], ids=["base_960h", "large_xlsr_53"])
def test_audio_wav2vec_manifests_match_the_released_architecture(manifest_path, head, layout):
    """The released wav2vec2 folders (StableAvatar's base-960h, S2V's large-xlsr-53) are the
    architecture the loader builds: the real-size model from the manifest's config has exactly its
    keys and shapes, and the tiny test folders share the released layout switches."""
    import json

    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC, Wav2Vec2Model

    from golden_kinds import EXT_DIR
    from wan.audio.tiny import LAYOUTS

    manifest = json.loads((EXT_DIR / manifest_path).read_text())
    assert {k: manifest["config"][k] for k in LAYOUTS[layout]} == LAYOUTS[layout]
    with torch.device("meta"):
        model = (Wav2Vec2ForCTC if head else Wav2Vec2Model)(Wav2Vec2Config(**manifest["config"]))
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == manifest["keys"]
