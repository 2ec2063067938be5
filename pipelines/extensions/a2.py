"""Tasks `a2` (SkyReels-A2: subject, object, background) and `a3` (object, edge/placement mask,
background) over an A2 checkpoint folder; see `pipelines.multiref`.

Prompt-file lines: `a2`: `subject.png<TAB>object.png<TAB>background.png<TAB>prompt`;
`a3`: `object.png<TAB>mask.png<TAB>background.png<TAB>prompt`. Optional fields may be empty.
"""

import json
import shutil
import tempfile
from pathlib import Path

import torch

from wan.checkpoint import read_state_dict, save_state_dict

from ..folder_convert import official_to_diffusers
from ..loading import check_folder as check_wan_folder
from ..multiref import A2_DEFAULTS, A2_SLOTS, A3_SLOTS, MultiReferencePipeline
from ..references import CLIP_PAD_SIZE
from ..tiny_checkpoint import make_tiny_checkpoint
from . import ExtensionTask, register

# A3's three slots take 9 pixel frames: a tiny folder generates 13 (4 frames past the references).
TINY_FRAME_NUM = 13
A2_FPS = 15  # the reference's output video


def check_folder(folder):
    check_wan_folder(folder, "i2v")


def make_tiny(folder, seed=0):
    """A tiny A2 folder in the released layout: diffusers `transformer/`, `vae/`, `text_encoder/`,
    `tokenizer/`, a transformers CLIPVisionModel (no projection) in `image_encoder/`, and
    `image_processor/`."""
    folder = Path(folder)
    with tempfile.TemporaryDirectory() as official:
        make_tiny_checkpoint("i2v", official, seed, overrides={"frame_num": TINY_FRAME_NUM})
        official_to_diffusers(official, folder, "i2v")
    encoder = folder / "image_encoder"
    state = {k: v for k, v in read_state_dict(encoder / "model.safetensors").items()
             if not k.startswith("visual_projection")}
    save_state_dict(state, encoder / "model.safetensors")
    config = json.loads((encoder / "config.json").read_text())
    config.update(architectures=["CLIPVisionModel"], projection_dim=None)
    (encoder / "config.json").write_text(json.dumps(config, indent=2))
    size = config["image_size"]
    (folder / "image_processor").mkdir(exist_ok=True)
    (folder / "image_processor" / "preprocessor_config.json").write_text(json.dumps(dict(
        image_processor_type="CLIPImageProcessor", do_resize=True, size={"height": size, "width": size},
        resample=3, do_center_crop=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
        do_convert_rgb=True, pad_size=CLIP_PAD_SIZE), indent=2))
    index = json.loads((folder / "model_index.json").read_text())
    index.update(_class_name="A2Pipeline", image_encoder=["transformers", "CLIPVisionModel"])
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    shutil.rmtree(folder / "scheduler", ignore_errors=True)
    return folder


def loader(slots, packed):
    def load(folder, args, config):
        dtype = getattr(torch, args.dtype) if getattr(args, "dtype", None) else None
        return MultiReferencePipeline.from_folder(folder, slots, packed, device=args.device, dtype=dtype)
    return load


register(ExtensionTask(
    name="a2", description="SkyReels-A2: video from a subject, an object and a background image",
    fields=tuple(s.name for s in A2_SLOTS), optional=("object", "background"),
    check_folder=check_folder, load=loader(A2_SLOTS, packed=True), make_tiny=make_tiny,
    defaults=dict(A2_DEFAULTS), fps=A2_FPS))

register(ExtensionTask(
    name="a3", description="A3: video from an object, an optional edge/placement mask and an optional background",
    fields=tuple(s.name for s in A3_SLOTS), optional=("mask", "background"),
    check_folder=check_folder, load=loader(A3_SLOTS, packed=False), make_tiny=make_tiny,
    defaults=dict(A2_DEFAULTS), fps=A2_FPS))
