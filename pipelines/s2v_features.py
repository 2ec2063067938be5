"""Wan2.2 S2V audio features: wav2vec2 hidden states (50 Hz) -> one feature vector per video frame.

As the official `AudioEncoder`: all hidden states are linearly interpolated (align_corners) from 50 Hz
to 30 Hz, then video frame i at `fps` takes the 30 Hz feature round(i * 30 / fps) (numpy rounding),
or zeros past the end of the audio.
"""

import numpy as np
import torch
import torch.nn.functional as F

WAV2VEC_RATE = 50   # hidden states per second (16 kHz audio, 320x conv stride)
FEATURE_RATE = 30   # the official intermediate frame rate


def to_feature_rate(hidden_states):
    """[S, T, C] hidden states at 50 Hz -> [S, int(T / 50 * 30), C] at 30 Hz."""
    length = int(hidden_states.shape[1] / float(WAV2VEC_RATE) * FEATURE_RATE)
    if length < 1:
        raise ValueError(f"audio too short: {hidden_states.shape[1]} wav2vec2 frame(s) give no feature at "
                         f"{FEATURE_RATE} Hz; give at least 45 ms of audio (2 wav2vec2 frames)")
    resampled = F.interpolate(hidden_states.float().transpose(1, 2), size=length, mode="linear", align_corners=True)
    return resampled.transpose(1, 2)


def features_per_frame(features, num_frames, fps=16):
    """[S, T30, C] features at 30 Hz -> [S, C, num_frames]: video frame i at `fps` takes the feature
    nearest its time; frames past the audio get zeros."""
    times = np.linspace(0, num_frames / fps, num_frames, endpoint=False)
    index = torch.from_numpy(np.round(times * FEATURE_RATE).astype(np.int64))
    inside = index < features.shape[1]
    frames = features.new_zeros(features.shape[0], num_frames, features.shape[2])
    frames[:, inside] = features[:, index[inside]]
    return frames.transpose(1, 2)
