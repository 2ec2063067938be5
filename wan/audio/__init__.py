"""Audio front end of the audio-driven models (StableAvatar, Wan2.2 S2V): ffmpeg decoding and muxing
(`decode`), wav2vec2 speech features (`wav2vec`), tiny random wav2vec2 folders for tests (`tiny`)."""

from .decode import AudioError, load_audio, mux_audio, probe_streams, save_wav
from .wav2vec import Wav2Vec2Features, normalize_waveform

__all__ = ["AudioError", "load_audio", "mux_audio", "probe_streams", "save_wav", "Wav2Vec2Features",
           "normalize_waveform"]
