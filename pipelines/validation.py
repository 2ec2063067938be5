"""Checks of user settings, run before any weights are loaded, each with a one-line fix."""

from pathlib import Path


class InvalidInput(ValueError):
    """A setting or input file the pipelines cannot use; the message says how to fix it."""


def parse_size(size):
    """'W*H' (the official CLI's format, e.g. '832*480' = 832 wide, 480 high) -> (width, height)."""
    try:
        width, height = (int(v) for v in str(size).split("*"))
    except ValueError:
        raise InvalidInput(f"size '{size}' is not of the form W*H, e.g. 832*480") from None
    return width, height


def check_size(preset, size):
    if size not in preset.sizes:
        raise InvalidInput(f"size {size} is not supported by {preset.name}; supported sizes (W*H): "
                           f"{', '.join(preset.sizes)}")
    return parse_size(size)


def check_frame_num(frame_num):
    if frame_num < 1 or (frame_num - 1) % 4:
        lower = max(1, (frame_num - 1) // 4 * 4 + 1)
        raise InvalidInput(f"frame_num must be 4n+1 (the VAE compresses time 4x after the first frame), got "
                           f"{frame_num}; use {lower} or {lower + 4}")
    return frame_num


def check_positive(name, value):
    if value < 1:
        raise InvalidInput(f"{name} must be at least 1, got {value}")
    return value


def check_image_file(path):
    """Opens an image file fully (so a truncated file fails here, not mid-run)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise InvalidInput(f"cannot read image {path}: {err}") from None


def check_input_file(path, kind="file"):
    """A non-image input (video, audio, pose folder, camera file) must exist before anything loads."""
    path = Path(path)
    if not path.exists():
        raise InvalidInput(f"{kind} not found: {path}")
    return path
