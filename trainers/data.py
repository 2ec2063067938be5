"""Training data: prompt files, video folders, VideoX-Fun JSON lists and precomputed latents.

Every dataset yields dicts (`text`, and `video` [3, T, H, W] in [-1, 1], or the cached `latents`,
`context`, ...). Samples are grouped into buckets of equal shape (aspect-ratio buckets for raw
video) and batched within a bucket. The order of micro-batches is a pure function of
(seed, global micro-batch index), so a resumed run, or a run on another number of processes, sees
the same samples at the same step. An unreadable sample is reported and replaced by the next one
of its bucket.
"""

import json
import logging
import math
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset

from pipelines.video_io import count_frames, read_frames_at, video_size

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".gif")
MAX_SKIPS = 16
LIST_KEYS = ("text", "context")  # variable-length entries, kept as lists by `collate`


def resize_crop(frames, height, width):
    """frames [T, 3, H, W] float -> [T, 3, height, width]: resize to cover the target, center-crop."""
    h, w = frames.shape[-2:]
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    if size != (h, w):
        frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False, antialias=True)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return frames[:, :, top:top + height, left:left + width]


def nearest_bucket(height, width, buckets):
    """The (h, w) bucket whose aspect ratio is nearest (in log ratio) to height x width."""
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - math.log(height / width)))


def sample_frame_indices(total, num_frames, stride, rng):
    """`num_frames` indices `stride` apart (stride lowered if the video is short) from a random start."""
    if total < num_frames:
        raise ValueError(f"video has {total} frames, fewer than the {num_frames} needed")
    stride = min(stride, (total - 1) // max(num_frames - 1, 1)) or 1
    start = rng.randint(0, total - 1 - (num_frames - 1) * stride)
    return list(range(start, start + num_frames * stride, stride))


def media_size(path, is_image):
    """(height, width) of an image or video file, read from its header."""
    if is_image:
        from PIL import Image

        with Image.open(path) as image:
            return image.size[::-1]
    return video_size(path)


def _open_rgb(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def to_clip(pixels, height, width):
    """uint8 frames [T, H, W, 3] -> [3, T, height, width] in [-1, 1], covered and center-cropped."""
    video = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    return resize_crop(video, height, width).transpose(0, 1).contiguous()


class SampleSet(Dataset):
    """A dataset indexed by (sample index, epoch), with a bucket per sample and skipping of bad samples.

    Subclasses set `self.buckets` (one hashable key per sample) and implement `load(index, epoch)`
    and `describe(index)`.
    """

    buckets = ()

    def __len__(self):
        return len(self.buckets)

    def __getitem__(self, key):
        index, epoch = key
        for _ in range(MAX_SKIPS):
            try:
                return self.load(index, epoch)
            except Exception as e:  # any decoding error: report, then take the next sample of the bucket
                log.warning("skipping unreadable sample %s: %s: %s", self.describe(index), type(e).__name__, e)
                index = self.next_in_bucket(index)
        raise RuntimeError(f"{MAX_SKIPS} unreadable samples in a row (last: {self.describe(index)}); check the data")

    def next_in_bucket(self, index):
        members = self._members()[self.buckets[index]]
        return members[(members.index(index) + 1) % len(members)]

    def _members(self):
        if not hasattr(self, "_bucket_members"):
            self._bucket_members = defaultdict(list)
            for i, key in enumerate(self.buckets):
                self._bucket_members[key].append(i)
        return self._bucket_members


class PromptDataset(SampleSet):
    """A text file with one prompt per line (blank lines ignored), for data-free trainers."""

    def __init__(self, path):
        self.prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
        self.buckets = [None] * len(self.prompts)

    def describe(self, index):
        return f"prompt {index}"

    def load(self, index, epoch):
        return {"text": self.prompts[index]}


class VideoDataset(SampleSet):
    """Clips of videos (and images) with captions, resized and center-cropped to their bucket.

    entries: dicts with `file_path`, `text`, `type` ("video" | "image"), optional `height`/`width`, and
    optional `control_file_path` (a control video / image aligned with the sample: `control_video`).
    """

    def __init__(self, entries, num_frames, frame_stride, height, width, buckets=(), seed=0):
        self.num_frames, self.frame_stride, self.seed = num_frames, frame_stride, seed
        sizes = [tuple(b) for b in buckets] or [(height, width)]
        self.entries, self.buckets = [], []
        for entry in entries:
            is_image = entry.get("type", "video") == "image"
            if len(sizes) > 1 and not ("height" in entry and "width" in entry):
                try:
                    entry = dict(entry, **dict(zip(("height", "width"), media_size(entry["file_path"], is_image))))
                except Exception as e:
                    log.warning("skipping unreadable sample %s: %s", entry["file_path"], e)
                    continue
            size = nearest_bucket(entry["height"], entry["width"], sizes) if len(sizes) > 1 else sizes[0]
            self.entries.append(entry)
            self.buckets.append((1 if is_image else num_frames, *size))

    @classmethod
    def from_folder(cls, folder, **kwargs):
        """A folder of NNN.mp4 videos, each with its caption in NNN.txt."""
        entries = []
        for video in sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in VIDEO_SUFFIXES):
            caption = video.with_suffix(".txt")
            if not caption.exists():
                log.warning("skipping %s: no caption file %s", video, caption.name)
                continue
            entries.append({"file_path": str(video), "text": caption.read_text().strip(), "type": "video"})
        return cls(entries, **kwargs)

    @classmethod
    def from_json(cls, path, root=None, **kwargs):
        """A VideoX-Fun metadata list: [{"file_path", "text", "type": "video" | "image"}, ...] (control
        data adds "control_file_path")."""
        root = Path(root) if root else Path(path).parent
        with open(path) as f:
            entries = json.load(f)
        entries = [dict(e, file_path=str(root / e["file_path"]),
                        **({"control_file_path": str(root / e["control_file_path"])} if e.get("control_file_path")
                           else {})) for e in entries]
        return cls(entries, **kwargs)

    def describe(self, index):
        return self.entries[index]["file_path"]

    def load(self, index, epoch):
        entry = self.entries[index]
        frames, height, width = self.buckets[index]
        if entry.get("type", "video") == "image":
            pixels = np.array(_open_rgb(entry["file_path"]))[None]
        else:
            rng = random.Random(f"{self.seed}/{epoch}/{index}")
            indices = sample_frame_indices(count_frames(entry["file_path"]), frames, self.frame_stride, rng)
            pixels = read_frames_at(entry["file_path"], indices)
        sample = {"video": to_clip(pixels, height, width), "text": entry["text"]}
        if entry.get("control_file_path"):  # VideoX-Fun control data: a frame-aligned control video
            control = entry["control_file_path"]
            sample["control_video"] = to_clip(read_frames_at(control, indices) if entry.get("type", "video") != "image"
                                              else np.array(_open_rgb(control))[None], height, width)
        return sample


class LatentDataset(SampleSet):
    """A folder of `*.safetensors` from scripts/cache_latents.py: `latents` [C, F, h, w], `context`
    [L, 4096] and, for image-conditioned models, `y` and `clip_fea`; the caption in the metadata."""

    def __init__(self, folder):
        self.files = sorted(Path(folder).glob("*.safetensors"))
        self.buckets = []
        for file in self.files:
            with safe_open(str(file), "pt") as f:
                self.buckets.append(tuple(f.get_slice("latents").get_shape()))

    def describe(self, index):
        return str(self.files[index])

    def load(self, index, epoch):
        with safe_open(str(self.files[index]), "pt") as f:
            sample = {key: f.get_tensor(key) for key in f.keys()}
            sample["text"] = (f.metadata() or {}).get("text", "")
        return sample


def build_dataset(data_cfg, seed=0):
    kind, path = data_cfg.kind, data_cfg.path
    if kind == "prompts":
        return PromptDataset(path)
    if kind == "latents":
        return LatentDataset(path)
    video = dict(num_frames=data_cfg.num_frames, frame_stride=data_cfg.frame_stride, height=data_cfg.height,
                 width=data_cfg.width, buckets=[tuple(b) for b in data_cfg.buckets], seed=seed)
    if kind == "videos":
        return VideoDataset.from_folder(path, **video)
    return VideoDataset.from_json(path, root=data_cfg.root, **video)


class BatchOrder:
    """The global sequence of micro-batches. Epoch e shuffles each bucket with (seed, e), cuts it
    into full batches and shuffles the batches; global micro-batch g is batch g % n of epoch g // n.
    Iterating yields the batches g = start, start + stride, ... as lists of (index, epoch)."""

    def __init__(self, buckets, batch_size, seed, start=0, stride=1):
        groups = defaultdict(list)
        for index, key in enumerate(buckets):
            groups[key].append(index)
        self.groups = [groups[key] for key in sorted(groups, key=repr)]
        self.batch_size, self.seed, self.start, self.stride = batch_size, seed, start, stride
        self.num_batches = sum(len(g) // batch_size for g in self.groups)
        if self.num_batches == 0:
            raise ValueError(f"no bucket holds batch_size={batch_size} samples "
                             f"(bucket sizes {sorted(len(g) for g in self.groups)}); add data or lower the batch size")
        small = [len(g) for g in self.groups if len(g) < batch_size]
        if small:
            log.warning("%d bucket(s) hold fewer than batch_size=%d samples and are never used", len(small), batch_size)
        self._epoch = (None, None)

    def epoch(self, e):
        if self._epoch[0] != e:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
            batches = []
            for group in self.groups:
                order = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
                batches += [order[i:i + self.batch_size]
                            for i in range(0, len(order) - self.batch_size + 1, self.batch_size)]
            self._epoch = (e, [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()])
        return self._epoch[1]

    def __iter__(self):
        g = self.start
        while True:
            e = g // self.num_batches
            yield [(index, e) for index in self.epoch(e)[g % self.num_batches]]
            g += self.stride


def collate(samples):
    """Stacks tensors; `text` and `context` (variable length) stay lists."""
    batch = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        batch[key] = values if key in LIST_KEYS or not torch.is_tensor(values[0]) else torch.stack(values)
    return batch


def build_loader(dataset, batch_size, seed, start, stride, num_workers):
    """An endless DataLoader over the micro-batches g = start, start + stride, ... of `BatchOrder`."""
    order = BatchOrder(dataset.buckets, batch_size, seed, start, stride)
    return DataLoader(dataset, batch_sampler=order, collate_fn=collate, num_workers=num_workers,
                      persistent_workers=num_workers > 0)
