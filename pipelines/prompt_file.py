"""Batch prompt files: one job a line.

Text tasks: `prompt`. Image tasks: `image_path<TAB>prompt`; FLF2V: `first<TAB>last<TAB>prompt`;
TI2V: either form. Extension tasks name their own fields (e.g. `image<TAB>audio<TAB>prompt`), some
of which may be left empty. Blank lines and lines starting with `#` are skipped. Relative paths are
resolved against the prompt file's folder.
"""

from dataclasses import dataclass, field
from pathlib import Path

from .validation import InvalidInput, check_image_file, check_input_file

IMAGE_FIELDS = {"t2v": (0,), "i2v": (1,), "flf2v": (2,), "ti2v": (0, 1), "causal": (0, 1)}


@dataclass
class PromptJob:
    line: int
    prompt: str
    images: tuple = ()                           # paths, core tasks
    inputs: dict = field(default_factory=dict)   # field -> path or None, extension tasks


def _prompt_lines(path):
    """(line number, fields before the prompt, prompt) of each job line; checks the prompt."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"prompt file not found: {path}")
    lines = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip() or raw.strip().startswith("#"):
            continue
        *fields, prompt = [f.strip() for f in raw.split("\t")]
        if not prompt:
            raise InvalidInput(f"{path}:{number}: the prompt is empty")
        lines.append((number, fields, prompt))
    if not lines:
        raise InvalidInput(f"prompt file {path} has no prompts (one prompt per line; # starts a comment)")
    return lines


def _resolve(path, prompt_file):
    path = Path(path)
    return path if path.is_absolute() else Path(prompt_file).parent / path


def read_prompt_file(path, task):
    """Parses and checks a prompt file for `task` (a key of IMAGE_FIELDS); every image must open."""
    jobs = []
    for number, images, prompt in _prompt_lines(path):
        if len(images) not in IMAGE_FIELDS[task]:
            expected = " or ".join(("image<TAB>" * n) + "prompt" for n in IMAGE_FIELDS[task])
            raise InvalidInput(f"{path}:{number}: task {task} expects lines of the form '{expected}', "
                               f"got {len(images) + 1} tab-separated field(s)")
        resolved = tuple(_resolve(p, path) for p in images)
        for image in resolved:
            check_image_file(image)
        jobs.append(PromptJob(number, prompt, resolved))
    return jobs


def read_extension_prompt_file(path, task):
    """Parses and checks a prompt file for an `ExtensionTask`: its `fields`, then the prompt."""
    jobs = []
    form = "<TAB>".join(task.fields + ("prompt",))
    for number, values, prompt in _prompt_lines(path):
        if len(values) != len(task.fields):
            raise InvalidInput(f"{path}:{number}: task {task.name} expects lines of the form '{form}' "
                               f"(optional, may be empty: {', '.join(task.optional) or 'none'}), "
                               f"got {len(values) + 1} tab-separated field(s)")
        inputs = {}
        for name, value in zip(task.fields, values):
            if not value:
                if name not in task.optional:
                    raise InvalidInput(f"{path}:{number}: the '{name}' field is required for task {task.name}")
                inputs[name] = None
                continue
            kind = task.file_kinds.get(name, "image")
            inputs[name] = _resolve(value, path)
            check_image_file(inputs[name]) if kind == "image" else check_input_file(inputs[name], kind)
        jobs.append(PromptJob(number, prompt, inputs=inputs))
    return jobs
