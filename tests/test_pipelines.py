"""End-to-end generation on tiny checkpoints: every task, both folder layouts, seeds, MoE routing."""

import pytest
import torch

from pipelines.folder_convert import official_to_diffusers
from pipelines.loading import load_components
from pipelines.tiny_checkpoint import make_tiny_checkpoint
from pipelines.validation import InvalidInput
from pipelines.wan_video import SampleSettings, WanVideoPipeline

TASKS = ["t2v", "i2v", "flf2v", "ti2v", "t2v-A14B", "i2v-A14B"]
FAST = dict(size="64*64", frame_num=5, sample_steps=2)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {task: make_tiny_checkpoint(task, root / task) for task in TASKS}


def _images(task):
    g = torch.Generator().manual_seed(1)
    image = torch.rand(3, 70, 90, generator=g) * 2 - 1
    return {"t2v": [], "t2v-A14B": [], "i2v": [image], "i2v-A14B": [image], "ti2v": [image],
            "flf2v": [image, image.flip(-1)]}[task]


@pytest.mark.parametrize("task", TASKS)
def test_pipeline_every_task_makes_a_video_of_the_requested_shape(checkpoints, task):
    pipeline = WanVideoPipeline(load_components(checkpoints[task], task))
    settings = SampleSettings(**FAST, seed=3)
    video = pipeline.generate("a small red bird flying over the river", *_images(task), settings=settings,
                              progress=False)
    assert video.shape[:2] == (3, 5)
    if task in ("i2v", "flf2v", "i2v-A14B"):  # the image's aspect ratio sets the grid, area ~ 64*64
        assert video.shape[2] * video.shape[3] <= 64 * 64 and video.shape[2] < video.shape[3]
    else:
        assert video.shape[2:] == (64, 64)
    assert torch.isfinite(video).all() and video.abs().max() <= 1
    again = pipeline.generate("a small red bird flying over the river", *_images(task), settings=settings,
                              progress=False)
    assert torch.equal(video, again)
    other_seed = pipeline.generate("a small red bird flying over the river", *_images(task),
                                   settings=SampleSettings(**FAST, seed=4), progress=False)
    assert not torch.equal(video, other_seed)


def test_pipeline_moe_switches_from_high_to_low_noise_expert(checkpoints):
    pipeline = WanVideoPipeline(load_components(checkpoints["t2v-A14B"], "t2v-A14B"))
    pipeline.generate("a dog running", settings=SampleSettings(size="64*64", frame_num=5, sample_steps=6),
                      progress=False)
    boundary = 0.875 * 1000
    assert [e for _, e in pipeline.expert_trace] == [
        "high_noise_model" if t >= boundary else "low_noise_model" for t, _ in pipeline.expert_trace]
    experts = [e for _, e in pipeline.expert_trace]
    assert experts[0] == "high_noise_model" and experts[-1] == "low_noise_model"


def test_pipeline_ti2v_keeps_the_image_latent_and_runs_text_only(checkpoints):
    pipeline = WanVideoPipeline(load_components(checkpoints["ti2v"], "ti2v"))
    image = _images("ti2v")[0]
    with_image = pipeline.generate("a cat", image, settings=SampleSettings(**FAST), progress=False)
    text_only = pipeline.generate("a cat", settings=SampleSettings(**FAST), progress=False)
    assert with_image.shape == text_only.shape and not torch.equal(with_image, text_only)


@pytest.mark.parametrize("task", ["i2v", "t2v-A14B", "ti2v"])
def test_pipeline_diffusers_folder_gives_the_same_video(checkpoints, tmp_path, task):
    diffusers_dir = official_to_diffusers(checkpoints[task], tmp_path / "diffusers", task)
    settings = SampleSettings(**FAST, seed=7)
    videos = [WanVideoPipeline(load_components(folder, task)).generate("a city at night", *_images(task),
                                                                     settings=settings, progress=False)
              for folder in (checkpoints[task], diffusers_dir)]
    torch.testing.assert_close(videos[0], videos[1], atol=1e-5, rtol=0)


def test_pipeline_rejects_bad_settings(checkpoints):
    pipeline = WanVideoPipeline(load_components(checkpoints["i2v"], "i2v"))
    with pytest.raises(InvalidInput, match="supported sizes \\(W\\*H\\): 64\\*64, 96\\*64"):
        pipeline.generate("x", *_images("i2v"), settings=SampleSettings(size="832*480"), progress=False)
    with pytest.raises(InvalidInput, match="4n\\+1.*got 6; use 5 or 9"):
        pipeline.generate("x", *_images("i2v"), settings=SampleSettings(frame_num=6), progress=False)
    with pytest.raises(InvalidInput, match="needs an input image"):
        pipeline.generate("x", settings=SampleSettings(**FAST), progress=False)
    with pytest.raises(InvalidInput, match="prompt is empty"):
        pipeline.generate("  ", *_images("i2v"), settings=SampleSettings(**FAST), progress=False)
