"""StableAvatar audio-adapter training through train.py's loop on tiny talking videos."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.extensions.stableavatar import make_tiny
from pipelines.video_io import save_video
from trainers.avatar_data import AvatarVideoDataset
from trainers.config import ConfigError, load_config
from trainers.loop import train
from trainers.stableavatar import mask_weights
from wan.audio import mux_audio, save_wav
from wan.checkpoint import read_state_dict
from wan.modules.stableavatar import StableAvatarModel

from conftest import REPO_ROOT

TINY = REPO_ROOT / "configs" / "tests" / "tiny_avatar.yaml"
FRAMES, SIZE = 13, 32


def talking_clip(index):
    """[3, FRAMES, SIZE, SIZE]: a face-like disc whose 'mouth' opens with the audio envelope, and the audio."""
    rate = 16000
    t = torch.arange(FRAMES * 640) / rate
    envelope = 0.5 + 0.5 * torch.sin(2 * math.pi * (2 + index) * t)
    audio = 0.4 * envelope * torch.sin(2 * math.pi * (150 + 40 * index) * t)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    frames = []
    for f in range(FRAMES):
        opening = 1 + 5 * envelope[f * 640].item()
        face = ((yy - 16) ** 2 + (xx - 16) ** 2 < 121).float()
        mouth = ((yy - 21).abs() < opening / 2) & ((xx - 16).abs() < 5)
        frames.append(torch.stack([face - 2 * mouth.float(), face * 0.5, -face]).clamp(-1, 1) * 0.9)
    return torch.stack(frames, 1), audio


@pytest.fixture(scope="module")
def avatar_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("avatar_train")
    folder = make_tiny(root / "ckpt", seed=7)
    videos = root / "videos"
    videos.mkdir()
    for i in range(3):
        video, audio = talking_clip(i)
        save_video(video, videos / f"{i:03d}.mp4", fps=25)
        mux_audio(videos / f"{i:03d}.mp4", save_wav(root / f"{i}.wav", audio))
        (videos / f"{i:03d}.txt").write_text("The protagonist is talking")
        if i < 2:  # the third clip has no masks: plain loss
            face = np.zeros((SIZE, SIZE), np.uint8)
            face[5:27, 5:27] = 255
            lip = np.zeros((SIZE, SIZE), np.uint8)
            lip[18:25, 10:22] = 255
            Image.fromarray(face).save(videos / f"{i:03d}_face.png")
            Image.fromarray(lip).save(videos / f"{i:03d}_lip.png")
    overrides = [f"data.path={videos}", f"model.checkpoint={folder / 'diffusion_pytorch_model.safetensors'}",
                 f"encoders.vae_checkpoint={folder / 'Wan2.1_VAE.pth'}",
                 f"encoders.t5_checkpoint={folder / 'models_t5_umt5-xxl-enc-bf16.pth'}",
                 f"encoders.t5_tokenizer={folder / 'google/umt5-xxl'}",
                 f"encoders.clip_checkpoint={folder / 'models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth'}",
                 f"avatar.wav2vec={folder / 'wav2vec2-base-960h'}"]
    return folder, videos, overrides


def test_avatar_mask_loss_schedule():
    face = torch.zeros(2, 1, 8, 8)
    face[:, :, 2:6, 2:6] = 1
    lip = torch.zeros(2, 1, 8, 8)
    lip[:, :, 4:6, 3:5] = 1
    has = torch.tensor([True, False])
    grid = (3, 4, 4)
    both, only_face, only_lip = (mask_weights(face, lip, has, grid, u) for u in (0.1, 0.45, 0.9))
    assert both.shape == (2, 1, 3, 4, 4)
    assert torch.equal(both[1], torch.ones(1, 3, 4, 4)) and torch.equal(only_lip[1], torch.ones(1, 3, 4, 4))
    assert torch.allclose(both[0], 1 + only_face[0] + only_lip[0])
    assert only_face[0].max() == 1 and only_face[0, :, :, 0, 0].max() == 0  # outside the face: no loss
    assert 0 < only_lip[0].sum() < only_face[0].sum()


def test_avatar_dataset_reads_audio_and_masks(avatar_data):
    _, videos, _ = avatar_data
    dataset = AvatarVideoDataset.from_folder(videos, num_frames=9, frame_stride=1, height=32, width=32, seed=0)
    masked, plain = dataset[(0, 0)], dataset[(2, 0)]
    assert masked["video"].shape == (3, 9, 32, 32) and masked["audio"].shape == (9 * 640,)
    assert masked["has_masks"] and masked["face_mask"].shape == (1, 32, 32) and masked["lip_mask"].max() == 1
    assert not plain["has_masks"] and plain["face_mask"].sum() == 0
    assert masked["audio"].abs().max() > 0.1


def test_avatar_bad_config(avatar_data):
    _, _, overrides = avatar_data
    with pytest.raises(ConfigError, match="avatar.wav2vec"):
        load_config(TINY, [o for o in overrides if not o.startswith("avatar.")])


def test_avatar_adapter_training_lowers_the_loss(avatar_data, tmp_path):
    folder, _, overrides = avatar_data
    history = train(load_config(TINY, overrides), tmp_path)
    mse = [r["mse"] for r in history]  # unweighted: the mask-weighted loss jumps with the schedule's draw
    assert len(mse) == 8 and all(np.isfinite([r["loss"] for r in history]))
    assert np.mean(mse[-3:]) < 0.85 * np.mean(mse[:3]), mse
    assert {r["clip_level"] for r in history} == {0.0, 1.0} and min(r["audio_kept"] for r in history) == 0
    export = tmp_path / "checkpoints" / "step_000008"
    start = read_state_dict(folder / "diffusion_pytorch_model.safetensors")
    trained = read_state_dict(export / "model.safetensors")
    assert trained.keys() == start.keys()
    assert torch.equal(trained["patch_embedding.weight"], start["patch_embedding.weight"])  # frozen
    for key in ("blocks.0.cross_attn.k_vocal.weight", "vocal_projector.proj_model.proj.weight",
                "blocks.1.ffn.0.weight"):
        assert not torch.equal(trained[key], start[key]), key
    model = StableAvatarModel.from_config(json.loads((export / "config.json").read_text()))
    model.load_state_dict(trained)
