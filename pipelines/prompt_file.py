"""Batch prompt files: one job a line.

Text tasks: `prompt`. Image tasks: `image_path<TAB>prompt`; FLF2V: `first<TAB>last<TAB>prompt`;
TI2V: either form. Blank lines and lines starting with `#` are skipped. Relative image paths are
resolved against the prompt file's folder.
"""

from dataclasses import dataclass
from pathlib import Path

from .validation import InvalidInput, check_image_file

IMAGE_FIELDS = {"t2v": (0,), "i2v": (1,), "flf2v": (2,), "ti2v": (0, 1), "causal": (0, 1)}


@dataclass
class PromptJob:
    line: int
    prompt: str
    images: tuple = ()  # paths


def read_prompt_file(path, task):
    """Parses and checks a prompt file for `task` (a key of IMAGE_FIELDS); every image must open."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"prompt file not found: {path}")
    jobs = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = [f.strip() for f in raw.rstrip("\n").split("\t")]
        *images, prompt = fields
        if len(images) not in IMAGE_FIELDS[task]:
            expected = " or ".join(("image<TAB>" * n) + "prompt" for n in IMAGE_FIELDS[task])
            raise InvalidInput(f"{path}:{number}: task {task} expects lines of the form '{expected}', "
                               f"got {len(fields)} tab-separated field(s)")
        if not prompt:
            raise InvalidInput(f"{path}:{number}: the prompt is empty")
        resolved = tuple(p if Path(p).is_absolute() else path.parent / p for p in map(Path, images))
        for image in resolved:
            check_image_file(image)
        jobs.append(PromptJob(number, prompt, resolved))
    if not jobs:
        raise InvalidInput(f"prompt file {path} has no prompts (one prompt per line; # starts a comment)")
    return jobs
