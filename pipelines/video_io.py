"""Images in, videos out: conversions between PIL / files and [-1, 1] tensors, and mp4 writing."""

import numpy as np
import torch
import torch.nn.functional as F


def image_to_tensor(image):
    """PIL image -> [3, H, W] float tensor in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1


def resize_cover(image, width, height):
    """[3, H, W] -> [3, height, width]: scale to cover the target, then centre-crop (no distortion)."""
    h, w = image.shape[1:]
    scale = max(width / w, height / h)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    image = F.interpolate(image[None], size=(new_h, new_w), mode="bicubic", align_corners=False)[0]
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return image[:, top:top + height, left:left + width].clamp(-1, 1)


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
