"""`inference.py` end to end on a tiny checkpoint, and its up-front checks of bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.tiny_checkpoint import make_tiny_checkpoint

from conftest import mp4_fps, mp4_frames, run_inference_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_i2v(tmp_path_factory):
    return make_tiny_checkpoint("i2v", tmp_path_factory.mktemp("ckpt") / "i2v")


def run_inference(*args):
    return subprocess.run([sys.executable, str(REPO / "inference.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=REPO)


def test_inference_writes_videos_and_sidecars(tiny_i2v, tmp_path):
    prompts = tmp_path / "prompts.txt"
    image = REPO / "prompts" / "images" / "first_frame.png"
    prompts.write_text(f"# comment\n{image}\tA bird flies over a river.\n\n{image}\tWaves on a beach.\n")
    out = tmp_path / "out"
    result = run_inference("--task", "i2v", "--checkpoint_dir", tiny_i2v, "--data_path", prompts,
                           "--output_folder", out, "--frame_num", 5, "--sample_steps", 2, "--seed", 11, "--fps", 8)
    assert result.returncode == 0, result.stderr
    videos = sorted(out.glob("*.mp4"))
    assert [v.name for v in videos] == ["000_A_bird_flies_over_a_river.mp4", "001_Waves_on_a_beach.mp4"]
    for index, video in enumerate(videos):
        frames = mp4_frames(video)
        assert len(frames) == 5 and mp4_fps(video) == 8
        sidecar = json.loads(video.with_suffix(".json").read_text())
        assert sidecar["seed"] == 11 + index and sidecar["frame_num"] == 5 and sidecar["task"] == "i2v-14B"
        assert frames[0].shape == (sidecar["height"], sidecar["width"], 3)
    assert not list(out.glob(".*tmp*"))


def test_inference_yaml_config_is_overridden_by_the_command_line(tiny_i2v, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("frame_num: 9\nsample_steps: 1\nseed: 5\n")
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"{REPO / 'prompts/images/first_frame.png'}\tA tree.\n")
    result = run_inference("--task", "i2v", "--checkpoint_dir", tiny_i2v, "--data_path", prompts,
                           "--output_folder", tmp_path / "out", "--config_path", config, "--frame_num", 5)
    assert result.returncode == 0, result.stderr
    sidecar = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert (sidecar["frame_num"], sidecar["sample_steps"], sidecar["seed"]) == (5, 1, 5)


BAD_INPUTS = [
    ("size", ["--size", "832*480"], "size 832*480 is not supported by i2v-14B; supported sizes (W*H): 64*64, 96*64"),
    ("frames", ["--frame_num", "8"], "frame_num must be 4n+1"),
    ("empty_prompts", [], "has no prompts"),
    ("bad_image", [], "cannot read image"),
    ("missing_image", [], "image not found"),
    ("missing_file", [], "missing: "),
    ("missing_folder", [], "checkpoint folder not found"),
    ("wrong_task", ["--task", "t2v-A14B"], "holds a 'i2v-14B' model, which task 't2v-A14B' cannot run"),
    ("teacache_model", ["--teacache_threshold", "0.1"], "no TeaCache coefficients for model"),
    ("cfg_skip", ["--cfg_skip_ratio", "1.5"], "--cfg_skip_ratio must be in [0, 1]"),
]


@pytest.mark.parametrize("case,extra,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_inference_bad_input_fails_early_with_one_clear_line(tiny_i2v, tmp_path, capsys, case, extra, message):
    image = REPO / "prompts" / "images" / "first_frame.png"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{image}\tA bird.\n")
    checkpoint = tiny_i2v
    if case == "empty_prompts":
        prompts.write_text("# nothing here\n\n")
    elif case == "bad_image":
        (tmp_path / "broken.png").write_bytes(b"not a png")
        prompts.write_text("broken.png\tA bird.\n")
    elif case == "missing_image":
        prompts.write_text("nowhere.png\tA bird.\n")
    elif case == "missing_file":
        checkpoint = tmp_path / "partial"
        make_tiny_checkpoint("i2v", checkpoint)
        (checkpoint / "Wan2.1_VAE.pth").unlink()
    elif case == "missing_folder":
        checkpoint = tmp_path / "nowhere"
    args = {"--task": "i2v", "--checkpoint_dir": checkpoint, "--data_path": prompts,
            "--output_folder": tmp_path / "out"}
    for key, value in zip(extra[::2], extra[1::2]):
        args[key] = value
    assert run_inference_main(*(x for kv in args.items() for x in kv)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "out").exists()


CAUSAL_CONFIG = """
denoising_step_list: [1000, 500]
warp_denoising_step: true
timestep_shift: 5.0
context_noise: 0
num_frame_per_block: 2
independent_first_frame: {first}
num_output_frames: {frames}
model_kwargs: {{local_attn_size: -1, sink_size: 0}}
"""


def test_inference_causal_config_streams_any_number_of_frames(tiny_t2v, tmp_path):
    import torch

    from wan.modules.model import WanModel
    from wan.model_loading import read_dit_config

    config = tmp_path / "causal.yaml"
    config.write_text(CAUSAL_CONFIG.format(first="true", frames=5) + f"generator_ckpt: {tmp_path / 'sf.pt'}\n"
                      "use_ema: true\n")
    dit = WanModel.from_config(read_dit_config(tiny_t2v))
    torch.save({"generator": {f"model.{k}": torch.zeros_like(v) for k, v in dit.state_dict().items()},
                "generator_ema": {f"model.{k}": v for k, v in dit.state_dict().items()}}, tmp_path / "sf.pt")
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"A boat on a lake.\n{REPO / 'prompts/images/first_frame.png'}\tA boat, continued.\n")
    result = run_inference("--task", "t2v", "--checkpoint_dir", tiny_t2v, "--data_path", prompts,
                           "--output_folder", tmp_path / "out", "--config_path", config)
    assert result.returncode == 0, result.stderr
    assert "DiT weights from" in result.stderr
    for video in sorted((tmp_path / "out").glob("*.mp4")):
        frames = mp4_frames(video)
        # 5 latent frames in blocks [1, 2, 2] -> 1 + 8 + 8 pixel frames
        assert len(frames) == 17 and frames[0].shape == (64, 64, 3)
        sidecar = json.loads(video.with_suffix(".json").read_text())
        assert sidecar["frames"] == 17 and sidecar["num_frame_per_block"] == 2


def test_inference_lora_changes_the_video(tiny_t2v, tmp_path):
    import torch

    from wan.lora import inject_lora, save_lora
    from wan.model_loading import read_dit_config
    from wan.modules.model import WanModel

    dit = WanModel.from_config(read_dit_config(tiny_t2v))
    inject_lora(dit, ["blocks.*.self_attn.q", "blocks.*.ffn.0"], rank=2)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if "lora" in name:
                p.normal_(0, 0.5)
    save_lora(dit, tmp_path / "lora.safetensors")
    prompts = tmp_path / "p.txt"
    prompts.write_text("A red car.\n")
    outputs = []
    for name, extra in (("plain", []), ("lora", ["--lora", f"{tmp_path / 'lora.safetensors'}:0.7"])):
        result = run_inference("--task", "t2v", "--checkpoint_dir", tiny_t2v, "--data_path", prompts,
                               "--output_folder", tmp_path / name, "--frame_num", 5, "--sample_steps", 2, *extra)
        assert result.returncode == 0, result.stderr
        outputs.append(mp4_frames(next((tmp_path / name).glob("*.mp4"))))
    sidecar = json.loads(next((tmp_path / "lora").glob("*.json")).read_text())
    assert sidecar["loras"] == [f"{tmp_path / 'lora.safetensors'}:0.7"]
    assert any((a != b).any() for a, b in zip(*outputs))


def test_inference_teacache_and_cfg_skip_flags_skip_work_and_are_recorded(tiny_t2v, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("A red kite.\n")
    common = ["--task", "t2v", "--checkpoint_dir", tiny_t2v, "--data_path", prompts, "--frame_num", 5,
              "--sample_steps", 8, "--seed", 3]
    plain = run_inference(*common, "--output_folder", tmp_path / "plain")
    fast = run_inference(*common, "--output_folder", tmp_path / "fast", "--teacache_threshold", 100,
                         "--teacache_model", "Wan2.1-T2V-1.3B", "--cfg_skip_ratio", 0.25)
    assert plain.returncode == 0 and fast.returncode == 0, plain.stderr + fast.stderr
    sidecar = json.loads(next((tmp_path / "fast").glob("*.json")).read_text())
    # The first 5 steps always run; with a huge threshold every later one reuses the cached residual.
    assert (sidecar["teacache_threshold"], sidecar["teacache_steps_run"], sidecar["cfg_skip_ratio"]) == (100, 5, 0.25)
    videos = [mp4_frames(next((tmp_path / name).glob("*.mp4"))) for name in ("plain", "fast")]
    assert len(videos[1]) == 5 and any((a != b).any() for a, b in zip(*videos))


def _random_lora(folder, path):
    import torch

    from wan.lora import inject_lora, save_lora
    from wan.model_loading import read_dit_config
    from wan.modules.model import WanModel

    dit = WanModel.from_config(read_dit_config(folder))
    inject_lora(dit, ["blocks.*.self_attn.q"], rank=2)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if "lora" in name:
                p.normal_(0, 0.5)
    save_lora(dit, path)
    return path


def test_inference_memory_modes_each_write_a_video(tiny_t2v, tmp_path, single_thread):
    import inference
    from wan.offload import MEMORY_MODES

    prompts = tmp_path / "p.txt"
    prompts.write_text("A red car.\n")
    videos = {}
    for mode in MEMORY_MODES:
        out = tmp_path / mode
        assert inference.main(["--task", "t2v", "--checkpoint_dir", str(tiny_t2v), "--data_path", str(prompts),
                               "--output_folder", str(out), "--frame_num", "5", "--sample_steps", "2",
                               "--memory_mode", mode]) == 0
        videos[mode] = mp4_frames(next(out.glob("*.mp4")))
        assert len(videos[mode]) == 5
        assert json.loads(next(out.glob("*.json")).read_text())["memory_mode"] == mode
    # the offload modes only move weights: the video is the full-load one, bit for bit
    for mode in ("model_cpu_offload", "sequential_cpu_offload"):
        assert all((a == b).all() for a, b in zip(videos["model_full_load"], videos[mode])), mode


def test_inference_memory_mode_quantizes_after_the_lora_merge(tiny_t2v, tmp_path, single_thread):
    import torch

    import inference
    from wan.fp8 import FP8, FP8Linear, quantize_tensor
    from wan.lora import fuse_lora
    from wan.model_loading import read_dit_config
    from wan.modules.model import WanModel
    from wan.checkpoint import load_state_dict, read_state_dict

    lora = _random_lora(tiny_t2v, tmp_path / "lora.safetensors")
    prompts = tmp_path / "p.txt"
    prompts.write_text("A red car.\n")
    args = inference.parse_args(["--task", "t2v", "--checkpoint_dir", str(tiny_t2v), "--data_path", str(prompts),
                                 "--output_folder", str(tmp_path / "out"), "--lora", f"{lora}:0.7",
                                 "--memory_mode", "model_cpu_offload_and_qfloat8"])
    preset, config, _, _, _, loras = inference.validate(args)
    dit = inference.load(args, preset, config, loras).dit
    layer = dit.blocks[0].self_attn.q
    assert isinstance(layer, FP8Linear) and layer.weight.dtype == FP8
    assert isinstance(dit.blocks[1].ffn[0], FP8Linear)

    base = WanModel.from_config(read_dit_config(tiny_t2v))
    load_state_dict(base, read_state_dict(tiny_t2v / "diffusion_pytorch_model.safetensors"))
    plain_weight = base.blocks[0].self_attn.q.weight.detach().clone()
    with torch.no_grad():
        fuse_lora(base, lora, 0.7)
    merged_fp8, merged_scale = quantize_tensor(base.blocks[0].self_attn.q.weight)  # quantize(merge(W))
    assert torch.equal(layer.weight.view(torch.uint8), merged_fp8.view(torch.uint8))
    assert torch.equal(layer.scale_weight, merged_scale)
    plain_fp8, _ = quantize_tensor(plain_weight)
    assert not torch.equal(layer.weight.view(torch.uint8), plain_fp8.view(torch.uint8))


def test_inference_memory_mode_excludes_offload_model(tiny_t2v, tmp_path, capsys):
    import inference

    prompts = tmp_path / "p.txt"
    prompts.write_text("A red car.\n")
    assert inference.main(["--task", "t2v", "--checkpoint_dir", str(tiny_t2v), "--data_path", str(prompts),
                           "--output_folder", str(tmp_path / "out"), "--offload_model",
                           "--memory_mode", "model_cpu_offload"]) == 2
    assert "--memory_mode and --offload_model" in capsys.readouterr().err
