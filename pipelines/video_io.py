"""Images and videos in and out: video files and frame folders as tensors, PIL images as tensors, mp4 writing.

A video input is a video file (anything imageio's ffmpeg reads: mp4, webm, gif, ...) or a folder of
image frames (taken in file-name order; lossless, the better choice for masks). Pixels are [-1, 1]
floats ([3, F, H, W] for videos), or uint8 where memory matters (`read_video(..., uint8=True)`).
"""

import itertools
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .validation import InvalidInput, check_image_file

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_to_tensor(image):
    """PIL image -> [3, H, W] float tensor in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1


def to_unit(pixels):
    """uint8 pixels -> float in [-1, 1]."""
    return pixels.float() / 127.5 - 1


def resize_cover(image, width, height):
    """[3, H, W] -> [3, height, width]: scale to cover the target, then centre-crop (no distortion)."""
    h, w = image.shape[1:]
    scale = max(width / w, height / h)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    image = F.interpolate(image[None], size=(new_h, new_w), mode="bicubic", align_corners=False)[0]
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return image[:, top:top + height, left:left + width].clamp(-1, 1)


def letterbox(image, width, height, fill):
    """[3, H, W] in [-1, 1] -> [3, height, width]: scaled (bilinear) to fit inside, centred on a canvas
    of value `fill` (the family's padding colour, e.g. 1 for white, -1 for black)."""
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


def frame_files(folder, what="frame folder", exclude=()):
    """The image files of a frame folder in name order, those named in `exclude` left out; `what` names
    the folder in the error when it holds none."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.name not in exclude)
    if not files:
        raise InvalidInput(f"{what} {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def read_frames(path, max_frames=None):
    """The first `max_frames` (all if None) frames of a video file or frame folder, uint8 arrays [H, W, 3]."""
    path = Path(path)
    if path.is_dir():
        return [np.asarray(check_image_file(p)) for p in frame_files(path)[:max_frames]]
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
    frames = read_frames(path, max_frames)
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


def usable_frames(count):
    """The largest 4n+1 frame count <= count (the VAE's causal frame grouping)."""
    if count < 1:
        raise InvalidInput("a video input needs at least 1 frame")
    return (count - 1) // 4 * 4 + 1


def read_frames_at(path, indices):
    """The frames at sorted `indices` of a video file -> uint8 [len(indices), H, W, 3] (training clips)."""
    import imageio.v2 as imageio

    wanted, frames = set(indices), []
    with imageio.get_reader(str(path), "ffmpeg") as reader:
        for i, frame in enumerate(reader):
            if i in wanted:
                frames.append(frame)
            if i >= indices[-1]:
                break
    if len(frames) != len(indices):
        raise ValueError(f"could read only {len(frames)} of the {len(indices)} frames requested")
    return np.stack(frames)


def count_frames(path):
    """The number of frames of a video file."""
    import imageio.v2 as imageio

    with imageio.get_reader(str(path), "ffmpeg") as reader:
        return reader.count_frames()


def video_fps(path):
    """The frame rate of a video file, from its header."""
    import imageio.v2 as imageio

    with imageio.get_reader(str(path), "ffmpeg") as reader:
        return reader.get_meta_data()["fps"]


def video_size(path):
    """(height, width) of a video file, from its header."""
    import imageio.v2 as imageio

    with imageio.get_reader(str(path), "ffmpeg") as reader:
        width, height = reader.get_meta_data()["size"]
    return height, width


def video_to_frames(video):
    """[3, F, H, W] in [-1, 1] -> uint8 array [F, H, W, 3]."""
    frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


def video_writer(path, fps=16):
    """An H.264 mp4 writer (the ffmpeg that imageio-ffmpeg ships); `append_data` one uint8 frame at a time."""
    import imageio

    return imageio.get_writer(str(path), fps=fps, codec="libx264", quality=8, macro_block_size=1,
                              ffmpeg_log_level="error")


def write_frames(writer, video):
    """Appends [3, F, H, W] in [-1, 1] to an open `video_writer`; returns (F, H, W)."""
    frames = video_to_frames(video)
    for frame in frames:
        writer.append_data(frame)
    return frames.shape[:3]


def save_video(video, path, fps=16):
    """Writes [3, F, H, W] in [-1, 1] as an mp4."""
    with video_writer(path, fps) as writer:
        write_frames(writer, video)
