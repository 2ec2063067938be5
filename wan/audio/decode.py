"""Audio in and out through the ffmpeg binary that imageio-ffmpeg ships (no torchaudio, no librosa).

`load_audio` decodes any container ffmpeg reads (wav, mp3, m4a, the audio track of an mp4) to a
mono float32 waveform at one sample rate; `mux_audio` adds an audio track to an mp4 written without
one (the video frames are copied, not re-encoded).
"""

import logging
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


class AudioError(ValueError):
    """An audio input that cannot be used; the message names the file and the fix."""


def ffmpeg_exe():
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _run_ffmpeg(args, what):
    result = subprocess.run([ffmpeg_exe(), "-nostdin", "-hide_banner", "-v", "error", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if result.returncode != 0:
        raise AudioError(f"ffmpeg failed to {what}: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout


def probe_streams(path):
    """Stream kinds of a media file in order, e.g. ['Video', 'Audio'] (reads its header only)."""
    result = subprocess.run([ffmpeg_exe(), "-nostdin", "-hide_banner", "-i", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    info = result.stderr.decode(errors="replace")
    if "Invalid data found" in info or "No such file" in info:
        raise AudioError(f"cannot read {path} as audio or video: {info.strip().splitlines()[-1]}")
    return [line.split(": ")[1].strip() for line in info.splitlines() if line.strip().startswith("Stream #")]


def _parse_wav(data):
    """A streamed RIFF/WAVE of 32-bit float samples -> [frames, channels] array. A wav written to a
    pipe has no valid chunk sizes, so the data chunk is taken to run to the end."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise AudioError("ffmpeg did not return a wav stream")
    offset, channels = 12, None
    while offset + 8 <= len(data):
        chunk, size = data[offset:offset + 4], struct.unpack("<I", data[offset + 4:offset + 8])[0]
        if chunk == b"fmt ":
            channels = struct.unpack("<H", data[offset + 10:offset + 12])[0]
        if chunk == b"data":
            samples = np.frombuffer(data[offset + 8:], dtype="<f4")
            samples = samples[:len(samples) // channels * channels]
            return samples.reshape(-1, channels)
        offset += 8 + size + (size & 1)
    raise AudioError("ffmpeg returned a wav stream without samples")


def load_audio(path, sample_rate=16000):
    """Decodes the first audio stream of `path` (wav, mp3, m4a, mp4, ...) -> [N] float32 in [-1, 1],
    mono (the mean of the channels, as librosa.load) at `sample_rate` Hz."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"audio file not found: {path}")
    if "Audio" not in probe_streams(path):
        raise AudioError(f"{path} has no audio stream; give a wav/mp3/m4a file or a video with a sound track")
    data = _run_ffmpeg(["-i", str(path), "-map", "0:a:0", "-vn", "-ar", str(sample_rate), "-c:a", "pcm_f32le",
                        "-f", "wav", "pipe:1"], f"decode the audio of {path}")
    samples = _parse_wav(data).mean(axis=1)
    if samples.size == 0:
        raise AudioError(f"the audio stream of {path} is empty")
    log.info("decoded %s: %.2f s at %d Hz", path, samples.size / sample_rate, sample_rate)
    return torch.from_numpy(np.clip(samples, -1.0, 1.0).astype(np.float32))


def save_wav(path, waveform, sample_rate=16000):
    """Writes [N] float samples in [-1, 1] as a 16-bit PCM mono wav."""
    import wave

    pcm = (torch.as_tensor(waveform).float().clamp(-1, 1).numpy() * 32767).round().astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.tobytes())
    return Path(path)


def mux_audio(video_path, audio_path, output_path=None, start=0.0):
    """Adds the audio of `audio_path` (from `start` seconds) as an AAC track to the mp4 `video_path`,
    cut to the video's duration. Writes `output_path` (default: replaces `video_path`)."""
    video_path = Path(video_path)
    output_path = Path(output_path or video_path)
    if "Audio" not in probe_streams(audio_path):
        raise AudioError(f"{audio_path} has no audio stream to add to {video_path}")
    tmp = output_path.with_name(f".{output_path.stem}.mux.mp4")
    _run_ffmpeg(["-y", "-i", str(video_path), "-ss", f"{start:.6f}", "-i", str(audio_path), "-map", "0:v:0",
                 "-map", "1:a:0", "-c:v", "copy", "-c:a", "aac", "-shortest", str(tmp)],
                f"add the audio of {audio_path} to {video_path}")
    os.replace(tmp, output_path)
    return output_path
