"""Talking-video clips for StableAvatar adapter training: a folder of NNN.mp4 (with a sound track) +
NNN.txt captions, optionally NNN_face.png and NNN_lip.png masks (white = face / lips).

Each sample is a `VideoDataset` clip plus the audio under it (16 kHz mono, from the clip's first frame
for its (frames - 1) * stride + 1 source frames, as the reference dataset) and the masks resized and
cropped like the frames. Clips of one batch must share their fps (batch size 1, as the reference, or
25 fps data) so that their audio has one length.
"""

import random
from pathlib import Path

import numpy as np
import torch

from pipelines.video_io import count_frames, video_fps
from wan.audio import load_audio
from wan.audio.wav2vec import SAMPLE_RATE

from .data import VideoDataset, resize_crop, sample_frame_indices

MASKS = ("face", "lip")


def read_mask(path, height, width):
    """A grayscale PNG -> [1, height, width] in [0, 1], resized and cropped as the frames."""
    from PIL import Image

    with Image.open(path) as image:
        mask = torch.from_numpy(np.array(image.convert("L"), dtype=np.float32) / 255)
    return resize_crop(mask[None, None], height, width)[0]


class AvatarVideoDataset(VideoDataset):
    """`VideoDataset.from_folder` clips with `audio` [N] and, when the mask files exist, `face_mask` and
    `lip_mask` [1, H, W] (zeros and `has_masks` False otherwise)."""

    def load(self, index, epoch):
        sample = super().load(index, epoch)
        path = Path(self.entries[index]["file_path"])
        frames, height, width = self.buckets[index]
        # the clip's frames, drawn from the same (seed, epoch, index) stream as VideoDataset.load
        rng = random.Random(f"{self.seed}/{epoch}/{index}")
        indices = sample_frame_indices(count_frames(path), frames, self.frame_stride, rng)
        fps = video_fps(path)
        start = round(indices[0] / fps * SAMPLE_RATE)
        length = round((indices[-1] - indices[0] + 1) / fps * SAMPLE_RATE)
        audio = load_audio(path)[start:start + length]
        sample["audio"] = torch.cat([audio, audio.new_zeros(length - len(audio))])
        mask_files = {name: path.with_name(f"{path.stem}_{name}.png") for name in MASKS}
        sample["has_masks"] = torch.tensor(all(p.is_file() for p in mask_files.values()))
        for name, mask_path in mask_files.items():
            sample[f"{name}_mask"] = read_mask(mask_path, height, width) if sample["has_masks"] \
                else torch.zeros(1, height, width)
        return sample
