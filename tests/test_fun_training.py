"""VideoX-Fun training modes (trainers/fun.py): condition channels built online, runs of the shared loop."""

import json

import numpy as np
import pytest
import torch

from test_train import TINY, moving_square, write_encoders, write_videos
from trainers.config import ConfigError, load_config
from trainers.data import VideoDataset
from trainers.fun import INPAINT_PATTERNS, FunTrainer, inpaint_mask, mask_channels
from trainers.loop import train

pytestmark = pytest.mark.usefixtures("single_thread")

FUN_MODEL = ["trainer=fun", "model.config.in_dim=36", "model.config.model_type=i2v", "model.config.image_branch=false",
             "data.kind=json", "train.max_steps=2", "train.batch_size=1", "train.total_batch_size=1",
             "model.gradient_checkpointing=false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fun_train")
    write_videos(root / "videos")
    encoders = write_encoders(root)
    entries = [{"file_path": f"videos/{i:03d}.mp4", "control_file_path": f"videos/{(i + 1) % 4:03d}.mp4",
                "text": moving_square(i)[1], "type": "video"} for i in range(4)]
    (root / "meta.json").write_text(json.dumps(entries))
    return root, encoders


def test_fun_training_masks():
    g = torch.Generator().manual_seed(0)
    for pattern in INPAINT_PATTERNS:
        mask = inpaint_mask(pattern, 9, 32, 32, g)
        assert mask.shape == (1, 9, 32, 32) and set(mask.unique().tolist()) <= {0.0, 1.0}
    first = mask_channels(inpaint_mask("first_frame", 9, 32, 32, g)[None], 4, 4)
    assert first.shape == (1, 4, 3, 4, 4)
    assert first[:, :, 0].min() == 1 and first[:, :, 1:].max() == 0  # pixel frame 0 is latent frame 0
    last = mask_channels(inpaint_mask("first_and_last_frame", 9, 32, 32, g)[None], 4, 4)
    assert last[0, :, 2, 0, 0].tolist() == [0, 0, 0, 1]  # the last pixel frame: 4th of the last group


def test_fun_training_dataset_reads_aligned_control_video(data):
    root, _ = data
    dataset = VideoDataset.from_json(root / "meta.json", num_frames=5, frame_stride=1, height=32, width=32)
    sample = dataset[(0, 0)]
    assert sample["control_video"].shape == sample["video"].shape == (3, 5, 32, 32)
    assert not torch.equal(sample["control_video"], sample["video"])  # video 001 controls video 000


@pytest.mark.parametrize("mode", ["inpaint", "control"])
def test_fun_training_mode_conditions(mode, data, tmp_path):
    root, encoders = data
    cfg = load_config(TINY, [*FUN_MODEL, f"fun.train_mode={mode}", f"data.path={root / 'meta.json'}",
                             "fun.condition_dropout=0.0", *encoders])
    trainer = FunTrainer(cfg, torch.device("cpu"))
    batch = {"video": torch.rand(1, 3, 9, 32, 32) * 2 - 1, "text": ["a red square"],
             "control_video": torch.rand(1, 3, 9, 32, 32) * 2 - 1}
    inputs = trainer.encode(batch, torch.Generator().manual_seed(1))
    assert inputs["y"].shape == (1, 20, 3, 4, 4)
    if mode == "control":
        torch.testing.assert_close(inputs["y"][:, :16], trainer.encoders.vae.encode(batch["control_video"]).float())
        assert inputs["y"][:, 16:].abs().max() == 0
    else:
        assert ((inputs["y"][:, :4] == 0) | (inputs["y"][:, :4] == 1)).float().mean() > 0.5
    if mode == "control":  # the shared loop on JSON data with control videos
        history = train(cfg, tmp_path)
        assert len(history) == 2 and all(np.isfinite(r["loss"]) for r in history)


def test_fun_training_config_errors(data):
    root, encoders = data
    with pytest.raises(ConfigError, match="fun.train_mode must be one of"):
        load_config(TINY, [*FUN_MODEL, "fun.train_mode=depth", f"data.path={root / 'meta.json'}", *encoders])
    cfg = load_config(TINY, ["trainer=fun", "data.kind=json", f"data.path={root / 'meta.json'}", *encoders])
    with pytest.raises(ValueError, match="needs a model with at least 20 condition channels"):
        FunTrainer(cfg, torch.device("cpu"))
