"""Videos in: control, mask, pose and face-crop videos as [3, F, H, W] tensors in [-1, 1].

A video input is a video file (anything imageio's ffmpeg reads: mp4, webm, gif, ...) or a folder of
image frames (taken in file-name order; lossless, the better choice for masks).
"""

import itertools
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .validation import InvalidInput
from .video_io import resize_cover

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _frames(path, max_frames=None):
    """The first `max_frames` (all if None) frames as uint8 arrays [H, W, 3]."""
    path = Path(path)
    if path.is_dir():
        from PIL import Image

        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:max_frames]
        if not files:
            raise InvalidInput(f"frame folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return [np.asarray(Image.open(p).convert("RGB")) for p in files]
    import imageio

    try:
        with imageio.get_reader(str(path)) as reader:
            return [np.asarray(frame)[..., :3] for frame in itertools.islice(reader, max_frames)]
    except (OSError, RuntimeError, ValueError) as err:
        raise InvalidInput(f"cannot read video {path}: {err}") from None


def read_video(path, width=None, height=None, max_frames=None, uint8=False):
    """The first `max_frames` frames of a video file or frame folder -> [3, F, H, W] float in [-1, 1]
    (`uint8`: uint8 in [0, 255], a quarter of the memory for long videos; see `to_unit`), scaled to
    cover width x height and centre-cropped when a size is given (and differs)."""
    frames = _frames(path, max_frames)
    if not frames:
        raise InvalidInput(f"video {path} has no frames")
    video = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2)
    if width is not None and tuple(video.shape[2:]) != (height, width):
        resized = [resize_cover(to_unit(frame), width, height) for frame in video.unbind(1)]
        video = torch.stack([((f + 1) * 127.5).round().to(torch.uint8) if uint8 else f for f in resized], dim=1)
    elif not uint8:
        video = to_unit(video)
    log.info("read %d frames %dx%d from %s", video.shape[1], video.shape[3], video.shape[2], path)
    return video


def to_unit(pixels):
    """uint8 pixels -> float in [-1, 1]."""
    return pixels.float() / 127.5 - 1


def usable_frames(count):
    """The largest 4n+1 frame count <= count (the VAE's causal frame grouping)."""
    if count < 1:
        raise InvalidInput("a video input needs at least 1 frame")
    return (count - 1) // 4 * 4 + 1


def letterbox(image, width, height, fill):
    """[3, H, W] in [-1, 1] -> [3, height, width]: scaled (bilinear) to fit inside, centred on a canvas
    of value `fill` (VACE references: white, 1; Animate's reference: black, -1)."""
    h, w = image.shape[1:]
    if (h, w) == (height, width):
        return image.float()
    scale = min(height / h, width / w)
    new_h, new_w = int(h * scale), int(w * scale)
    resized = F.interpolate(image[None].float(), size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
    canvas = torch.full((3, height, width), float(fill))
    top, left = (height - new_h) // 2, (width - new_w) // 2
    canvas[:, top:top + new_h, left:left + new_w] = resized
    return canvas
