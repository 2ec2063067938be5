"""Inference tasks of the extension models (multi-reference, pose, audio avatars, Fun/VACE/Animate).

Each module of this package registers its task(s) with `register(ExtensionTask(...))` at import;
`inference.py`, `scripts/make_tiny_checkpoint.py` and `app.py` list them from `extension_tasks()`,
so a new family adds one module here and edits none of those files.
"""

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable

_TASKS = {}


@dataclass
class ExtensionTask:
    """One `--task` of an extension family.

    fields: the tab-separated prompt-file fields before the prompt, e.g. ("image", "audio").
    optional: those of `fields` that may be left empty.
    file_kinds: field -> "image" | "video" | "audio" | "file" (how the input is checked).
    defaults: the family's defaults: the `SampleSettings` fields (size, frame_num, sample_steps,
        guide_scale, ...; used where the user gives none) and its own options (e.g. an audio guidance
        scale), which a YAML `--config_path` may set.
    check_folder(folder): raises `wan.checkpoint.CheckpointError` naming what is missing; reads no weights.
    load(folder, args, config): the pipeline, an object with `dits` (the DiT modules a `--lora` is fused
        into) and `run(job, settings, seed, writer) -> dict` of the settings used (`job` is a `PromptJob`
        with `inputs` {field: Path or None}, `settings` a `SampleSettings` whose None fields take the
        defaults, `writer` takes uint8 HWC frames, see `pipelines.video_io.write_frames`); `config`
        holds the YAML's options. An `audio_track` entry (a path) in the returned dict is muxed into
        the written mp4 (`wan.audio.mux_audio`). An optional `memory_mode` attribute (a
        `wan.offload.MEMORY_MODES` name) is applied to the `dits` after the LoRA fusion.
    make_tiny(folder, seed): writes a tiny random-weight checkpoint folder for this task.
    """
    name: str
    description: str
    fields: tuple
    check_folder: Callable
    load: Callable
    make_tiny: Callable = None
    optional: tuple = ()
    file_kinds: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)
    fps: int = 16


def register(task):
    if task.name in _TASKS:
        raise ValueError(f"extension task '{task.name}' is registered twice")
    _TASKS[task.name] = task
    return task


def extension_tasks():
    """name -> ExtensionTask for every module of this package."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    return dict(_TASKS)
