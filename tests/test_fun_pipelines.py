"""The fun-inp / fun-control / fun-camera tasks end to end on tiny checkpoints (inference.py in process),
and the condition channels each Fun mode feeds its DiT."""

import json
from pathlib import Path

import pytest
import torch

from pipelines.extensions import extension_tasks
from pipelines.fun import FunInputs, FunPipeline, load_fun_components
from pipelines.video_io import save_video
from pipelines.wan_video import SampleSettings

from conftest import mp4_frames, run_inference_main

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "prompts" / "images" / "first_frame.png"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fun")
    tasks = extension_tasks()
    return {mode: tasks[f"fun-{mode}"].make_tiny(root / mode, 0) for mode in ("inp", "control", "camera")}


@pytest.fixture(scope="module")
def components(folders):
    return {mode: load_fun_components(folder) for mode, folder in folders.items()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fun_inputs")
    g = torch.Generator().manual_seed(0)
    save_video(torch.rand(3, 9, 48, 80, generator=g) * 2 - 1, root / "canny.mp4", fps=16)
    lines = ["https://example/video"]
    for i in range(9):  # a camera panning left: rotation about y
        angle = torch.tensor(0.05 * i)
        rotation = [[angle.cos(), 0, angle.sin()], [0, 1, 0], [-angle.sin(), 0, angle.cos()]]
        w2c = [float(v) for row in rotation for v in (*row, 0.0)]
        lines.append(" ".join(str(v) for v in [i, 0.53, 0.94, 0.5, 0.5, 0, 0, *w2c]))
    (root / "pan.txt").write_text("\n".join(lines) + "\n")
    return root


def _run(task, folder, prompt_line, out, *extra):
    prompts = out.parent / f"{task}.txt"
    prompts.write_text(prompt_line + "\n")
    return run_inference_main("--task", task, "--checkpoint_dir", folder, "--data_path", prompts, "--output_folder",
                              out, "--frame_num", 5, "--sample_steps", 2, "--size", "64*64", *extra)


@pytest.mark.parametrize("mode", ["inp", "control", "camera"])
def test_fun_task_writes_a_video(mode, folders, inputs, tmp_path):
    line = {"inp": f"{IMAGE}\t{IMAGE}\ta bird over a river",
            "control": f"{inputs / 'canny.mp4'}\t{IMAGE}\t{IMAGE}\ta dancer on a stage",
            "camera": f"{inputs / 'pan.txt'}\t{IMAGE}\ta street at night"}[mode]
    out = tmp_path / "out"
    assert _run(f"fun-{mode}", folders[mode], line, out) == 0
    videos = sorted(out.glob("*.mp4"))
    assert len(videos) == 1
    frames = mp4_frames(videos[0])
    assert len(frames) == 5 and frames[0].shape == (64, 64, 3)
    sidecar = json.loads(videos[0].with_suffix(".json").read_text())
    assert sidecar["frames"] == 5 and sidecar["guide_scale"] in (6.0, [6.0, 6.0])


def test_fun_task_errors_are_clear(folders, components, inputs, tmp_path, capsys):
    # the folder's model does not fit the task: reported before any weights load
    assert _run("fun-control", folders["inp"], f"{inputs / 'canny.mp4'}\t\t\tx", tmp_path / "out") == 2
    assert "not a Fun control model" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not a Fun control model"):
        FunPipeline(components["inp"], "control")
    pipeline = FunPipeline(components["camera"], "camera")
    with pytest.raises(ValueError, match="needs a camera pose file"):
        pipeline.generate("x", FunInputs(), SampleSettings(size="64*64", frame_num=5, sample_steps=1), progress=False)


def test_fun_condition_channels(components):
    settings = SampleSettings(size="64*64", frame_num=5, sample_steps=1).resolved(components["control"].preset)
    image = torch.rand(3, 40, 50) * 2 - 1
    control = FunPipeline(components["control"], "control")
    video = torch.rand(3, 5, 64, 64) * 2 - 1
    shape, kwargs, _ = control._condition(settings, FunInputs(start_image=image, control_video=video))
    assert shape == (16, 2, 8, 8) and kwargs["y"].shape == (1, 32, 2, 8, 8)
    y = kwargs["y"][0]
    torch.testing.assert_close(y[:16], control._encode(video))
    assert y[16:, 1:].abs().max() == 0 and y[16:, 0].abs().max() > 0  # start image in latent frame 0 only
    assert kwargs["full_ref"].abs().max() == 0  # ref_conv model without a reference: zero tokens
    assert kwargs["clip_fea"].shape[:2] == (1, 5)

    inp = FunPipeline(components["inp"], "inp")
    _, kwargs, _ = inp._condition(settings, FunInputs())
    assert kwargs["y"].abs().max() == 0 and kwargs["clip_fea"].abs().max() == 0  # text-to-video
    _, kwargs, _ = inp._condition(settings, FunInputs(start_image=image, end_image=image))
    mask = kwargs["y"][0, :4]
    assert mask[:, 0].min() == 1 and mask[:, 1, 0, 0].tolist() == [0, 0, 0, 1]  # last pixel frame known


def test_fun_wan22_control_experts_share_teacache_and_cfg_skip(tmp_path):
    from pipelines.extensions.fun import make_tiny
    from wan.teacache import TeaCache, teacache_coefficients

    components = load_fun_components(make_tiny(tmp_path / "wan22", mode="control", wan22=True))
    components.vae.decode = lambda latent, tiled=False: latent  # the sampled latents are what is checked
    cache = TeaCache(teacache_coefficients("Wan2.2-Fun-A14B-Control"), num_steps=3, threshold=0.1, skip_start_steps=1)
    pipeline = FunPipeline(components, "control", teacache=cache, cfg_skip_ratio=0.34)
    _, kwargs, _ = pipeline._condition(SampleSettings(size="64*64", frame_num=5).resolved(components.preset),
                                       FunInputs(start_image=torch.rand(3, 64, 64) * 2 - 1,
                                                 control_video=torch.rand(3, 5, 64, 64) * 2 - 1))
    assert kwargs["y"].shape == (1, 36, 2, 8, 8) and "clip_fea" not in kwargs  # control + mask + masked
    assert kwargs["y"][0, 16:20, 0].min() == 1 and kwargs["y"][0, 16:20, 1].max() == 0  # start frame known
    video = pipeline.generate("a dancer", FunInputs(ref_image=torch.rand(3, 64, 64) * 2 - 1,
                                                    control_video=torch.rand(3, 5, 64, 64) * 2 - 1),
                              SampleSettings(size="64*64", frame_num=5, sample_steps=3), progress=False)
    assert video.shape == (16, 2, 8, 8) and torch.isfinite(video).all()
    assert [e for _, e in pipeline.expert_trace] == ["high_noise_model"] * 2 + ["low_noise_model"]
    # one cache across both experts: the switch is a large change of e0 and runs the blocks; the last
    # step (cfg skip) runs the conditional branch alone, a batch of one
    assert [r["step"] for r in cache.trace] == [0, 1, 2]
    assert cache.trace[2]["computed"] and cache.trace[2]["rel"] > 0.1


def test_fun_gpu_memory_mode_option_quantizes_the_dit(folders, tmp_path):
    import inference
    from wan.fp8 import FP8Linear

    config = tmp_path / "fun.yaml"
    config.write_text("GPU_memory_mode: model_cpu_offload_and_qfloat8\n")
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"{IMAGE}\t\ta bird over a river\n")
    args = inference.parse_args(["--task", "fun-inp", "--checkpoint_dir", str(folders["inp"]), "--data_path",
                                 str(prompts), "--output_folder", str(tmp_path / "out"), "--config_path", str(config)])
    preset, options, _, _, _, loras = inference.validate(args)
    task = inference.load(args, preset, options, loras)
    assert isinstance(task.dits[0].blocks[0].self_attn.q, FP8Linear)
    assert _run("fun-inp", folders["inp"], f"{IMAGE}\t\tx", tmp_path / "out", "--config_path", str(config)) == 0
    assert len(list((tmp_path / "out").glob("*.mp4"))) == 1
    config.write_text("GPU_memory_mode: lowvram\n")
    with pytest.raises(ValueError, match="GPU_memory_mode 'lowvram' is not one of"):
        _run("fun-inp", folders["inp"], f"{IMAGE}\t\tx", tmp_path / "out2", "--config_path", str(config))
