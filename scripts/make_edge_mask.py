"""Edge image for A3's mask slot: white object outline on black, from a binary mask or a cut-out object.

    python scripts/make_edge_mask.py INPUT.png OUTPUT.png [--width 3] [--fill]

INPUT is a binary mask (white object on black), an RGBA cut-out (the alpha channel is the mask), or
an object on a plain white background (everything not near-white is the object). The outline is the
band of mask pixels within `--width` pixels of the background (a morphological gradient computed with
max-pooling: plain torch, no OpenCV). `--fill` writes the filled placement mask instead of the outline.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

BACKGROUND_LEVEL = 245  # an RGB cut-out's background: all channels at least this bright


def binary_mask(image):
    """A PIL image -> bool [H, W]: the alpha channel of RGBA cut-outs, else white-on-black masks
    (few distinct grey levels) thresholded at 128, else everything that is not near-white."""
    if image.mode in ("RGBA", "LA") and np.asarray(image.getchannel("A")).min() < 255:
        return np.asarray(image.getchannel("A")) >= 128
    rgb = np.asarray(image.convert("RGB"))
    grey = rgb.mean(axis=2)
    if ((grey < 32) | (grey > 223)).mean() > 0.99 and (rgb.max(axis=2) - rgb.min(axis=2)).max() < 32:
        return grey >= 128
    return ~(rgb >= BACKGROUND_LEVEL).all(axis=2)


def edge_from_mask(mask, width=3):
    """bool [H, W] -> bool [H, W]: mask pixels closer than `width` pixels to the background (the inner
    outline; outside the image counts as background)."""
    if width < 1:
        raise ValueError(f"edge width must be >= 1 pixel, got {width}")
    inside = torch.from_numpy(np.ascontiguousarray(mask)).float()[None, None]
    background = F.pad(1 - inside, (width,) * 4, value=1.0)
    near_background = F.max_pool2d(background, 2 * width + 1, stride=1)[0, 0] > 0
    return (inside[0, 0] > 0).numpy() & near_background.numpy()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--width", type=int, default=3, help="outline width in pixels")
    parser.add_argument("--fill", action="store_true", help="write the filled mask, not its outline")
    args = parser.parse_args(argv)
    if not Path(args.input).is_file():
        sys.exit(f"error: input image not found: {args.input}")
    with Image.open(args.input) as image:
        mask = binary_mask(image)
    if not mask.any():
        sys.exit(f"error: {args.input} has no object pixels (expected white on black, an alpha cut-out, "
                 f"or an object on white)")
    out = mask if args.fill else edge_from_mask(mask, args.width)
    Image.fromarray((out * 255).astype(np.uint8)).convert("RGB").save(args.output)
    print(f"wrote {args.output}: {int(out.sum())} of {out.size} pixels white")


if __name__ == "__main__":
    main()
