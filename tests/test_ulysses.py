"""Ulysses sequence parallelism and sharded inference on 2 processes (torchrun, gloo, CPU): the
sequence-parallel forwards of tiny DiTs and of the causal model with its KV cache equal the
single-process forwards, and `torchrun inference.py --ulysses_size 2` (with FSDP) writes the video of
one process. Run under torchrun, this file is the worker of the model checks (`sp_worker`)."""

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

from conftest import REPO_ROOT, mp4_frames, randomize, run_inference_main, tiny_dit_config
from scripts.sp_memory_plan import main as memory_plan
from test_causal import _generate_blocks, sharpen
from test_inference import CAUSAL_CONFIG
from trainers.parallelize import apply_fsdp
from wan.distributed import SequenceShard, apply_sequence_parallel
from wan.modules.causal_model import CausalWanModel
from wan.modules.model import WanModel

CASES = {}


def sp_case(fn):
    CASES[fn.__name__] = fn
    return fn


def sp_error(model, run, fsdp=False):
    """Max |run(sequence-parallel copy of model) - run(model)| on this rank (`fsdp`: the copy also sharded)."""
    parallel = copy.deepcopy(model)
    if fsdp:
        apply_fsdp(parallel)
    apply_sequence_parallel(parallel)
    with torch.no_grad():
        expected, actual = run(model), run(parallel)
    return (actual - expected).abs().max().item()


def dit_and_inputs(model_type="t2v", grid=(3, 6, 6), **config):
    """A tiny random DiT (peaked attention) and inputs x [2, in_dim, *grid], two prompts of different lengths."""
    config = tiny_dit_config(model_type, **config)
    model = sharpen(randomize(WanModel(**config))).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, config["in_dim"], *grid, generator=g)
    context = [torch.randn(n, config["text_dim"], generator=g) for n in (5, 3)]
    return model, x, context, g


@sp_case
def dit_t2v_padded_sequence():
    # 3 x 3 x 3 = 27 tokens: the second rank holds 13 and one padding token; 2 heads per rank
    model, x, context, _ = dit_and_inputs(num_heads=4)
    return sp_error(model, lambda m: m(x, torch.tensor([500.0, 800.0]), context))


@sp_case
def dit_ti2v_per_token_timesteps():
    model, x, context, g = dit_and_inputs("ti2v", grid=(3, 2, 6))  # 9 tokens
    t = torch.rand(2, 9, generator=g) * 1000
    return sp_error(model, lambda m: m(x, t, context))


@sp_case
def dit_i2v_clip_and_local_window():
    model, x, context, g = dit_and_inputs("i2v", grid=(3, 4, 6), window_size=(2, 3), clip_dim=32, clip_tokens=5)
    x, y = x[:, :16], x[:, 16:]
    clip = torch.randn(2, 5, 32, generator=g)
    return sp_error(model, lambda m: m(x, torch.tensor([300.0, 300.0]), context, y=y, clip_fea=clip))


@sp_case
def dit_fsdp_and_sequence_parallel():
    model, x, context, _ = dit_and_inputs(grid=(2, 4, 6))
    return sp_error(model, lambda m: m(x, torch.tensor([700.0, 200.0]), context), fsdp=True)


def causal_and_inputs(num_frames, **options):
    """A causal tiny DiT, x [1, 16, num_frames, 2, 6] (3 tokens per frame) and a prompt."""
    model, x, context, _ = dit_and_inputs(grid=(num_frames, 2, 6))
    return CausalWanModel(model, **options), x[:1], context[:1]


@sp_case
def causal_block_causal_forward():
    causal, x, context = causal_and_inputs(5, num_frame_per_block=2, independent_first_frame=True)
    t = torch.tensor([[0.0, 250.0, 250.0, 750.0, 750.0]])
    return sp_error(causal, lambda m: m(x, t, context))


@sp_case
def causal_kv_cache_rolling_window_and_sink():
    # blocks [1, 2, 2, 2, 2] of 3 or 6 tokens; the 4-frame window slides, the sink frame is re-rotated
    causal, x, context = causal_and_inputs(9, num_frame_per_block=2, independent_first_frame=True,
                                           local_attn_size=4, sink_size=1)
    per_block = [100.0 * (i + 1) for i in range(5)]
    return sp_error(causal, lambda m: _generate_blocks(m, x, context, per_block)[0])


def heads_error_message():
    model = WanModel(**tiny_dit_config(dim=48, num_heads=3))
    try:
        apply_sequence_parallel(model)
    except ValueError as err:
        return str(err)
    return "no error"


def sp_worker(out):
    """Runs every case on each rank; rank 0 writes {case: max error over ranks, 'heads': message}."""
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    results = {"heads": heads_error_message()}
    for name, case in CASES.items():
        error = torch.tensor(case())
        dist.all_reduce(error, op=dist.ReduceOp.MAX)
        results[name] = error.item()
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def launch(script, args, nproc=None):
    """Runs a script (under torchrun with `nproc` processes), one thread per process; returns the result."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] if nproc \
        else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(launcher + [str(script), *map(str, args)], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def sp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ulysses") / "results.json"
    result = launch(__file__, [out], nproc=2)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_sequence_parallel_matches_single_process(sp_results, case):
    assert sp_results[case] < 1e-5


def test_sequence_parallel_heads_must_divide_by_the_degree(sp_results):
    assert "Ulysses degree (2) must divide the DiT's 3 attention heads; use one of [1, 3]" in sp_results["heads"]


@pytest.mark.parametrize("length, degree", [(27, 2), (8, 4), (3, 4), (1, 2)])
def test_ulysses_shards_cover_the_sequence_once(length, degree):
    x = torch.arange(length)[None, :, None]
    shards = [SequenceShard(length, degree, rank) for rank in range(degree)]
    parts = [shard.split(x) for shard in shards]
    assert all(p.shape[1] == shards[0].local_length for p in parts)
    assert sum(s.num_real for s in shards) == length
    torch.testing.assert_close(torch.cat(parts, 1)[:, :length], x)


def videos_of_one_and_two_processes(tmp_path, args, parallel):
    """Runs inference.py in this process and on 2 (torchrun, with the `parallel` options); returns the
    frames of each video (by name) of both, and the 2-process run's output folder."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_inference_main(*args, "--output_folder", one) == 0
    result = launch(REPO_ROOT / "inference.py", [*args, "--output_folder", two, *parallel], nproc=2)
    assert result.returncode == 0, result.stderr[-4000:]
    names = sorted(v.name for v in one.glob("*.mp4"))
    assert names and sorted(v.name for v in two.glob("*.mp4")) == names
    return {n: (np.stack(mp4_frames(one / n)), np.stack(mp4_frames(two / n))) for n in names}, two


def assert_same_frames(videos):
    for name, (one, two) in videos.items():
        assert one.shape == two.shape, name
        # identical on this machine; a rounding difference in some BLAS may move a pixel by a level
        assert np.abs(one.astype(int) - two).max() <= 2, name


def test_distributed_inference_ulysses_and_fsdp_write_the_one_process_video(tiny_t2v, tmp_path, single_thread):
    prompts = tmp_path / "p.txt"
    prompts.write_text("A red car drives.\nA blue boat.\n")
    args = ["--task", "t2v", "--checkpoint_dir", tiny_t2v, "--data_path", prompts, "--frame_num", 5,
            "--sample_steps", 2, "--seed", 3]
    videos, out = videos_of_one_and_two_processes(tmp_path, args, ["--ulysses_size", 2, "--dit_fsdp", "--t5_fsdp"])
    assert_same_frames(videos)
    assert sorted(p.name for p in out.iterdir()) == ["000_A_red_car_drives.json", "000_A_red_car_drives.mp4",
                                                     "001_A_blue_boat.json", "001_A_blue_boat.mp4"]
    sidecar = json.loads((out / "001_A_blue_boat.json").read_text())
    assert sidecar["parallel"] == {"processes": 2, "ulysses_size": 2, "dit_fsdp": True, "t5_fsdp": True}
    assert sidecar["seed"] == 4


def test_distributed_inference_ulysses_causal_streaming_with_kv_cache(tiny_t2v, tmp_path, single_thread):
    config = tmp_path / "causal.yaml"
    config.write_text(CAUSAL_CONFIG.format(first="true", frames=5).replace("local_attn_size: -1, sink_size: 0",
                                                                           "local_attn_size: 4, sink_size: 1"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("A boat on a lake.\n")
    args = ["--task", "t2v", "--checkpoint_dir", tiny_t2v, "--data_path", prompts, "--config_path", config]
    videos, _ = videos_of_one_and_two_processes(tmp_path, args, ["--ulysses_size", 2])
    assert_same_frames(videos)
    assert len(next(iter(videos.values()))[0]) == 17


BAD_PARALLEL = [
    ("no_torchrun", ["--ulysses_size", "2"], "--ulysses_size 2 must equal the number of processes (1)"),
    ("causal_fsdp", ["--dit_fsdp", "--config_path", "CAUSAL"], "--dit_fsdp does not run causal configs"),
    ("t5_fsdp_on_cpu", ["--t5_fsdp", "--t5_cpu"], "cannot be combined with --t5_cpu"),
]


@pytest.mark.parametrize("extra, message", [c[1:] for c in BAD_PARALLEL], ids=[c[0] for c in BAD_PARALLEL])
def test_distributed_options_fail_early_with_one_clear_line(tiny_t2v, tmp_path, capsys, extra, message):
    config = tmp_path / "causal.yaml"
    config.write_text(CAUSAL_CONFIG.format(first="false", frames=4))
    prompts = tmp_path / "p.txt"
    prompts.write_text("A bird.\n")
    args = ["--task", "t2v", "--checkpoint_dir", tiny_t2v, "--data_path", prompts, "--output_folder", tmp_path / "out",
            *[config if a == "CAUSAL" else a for a in extra]]
    assert run_inference_main(*args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_sequence_parallel_memory_plan_prints_a_table_per_degree(capsys):
    memory_plan(["--preset", "t2v-14B", "--preset", "t2v-1.3B", "--size", "1280*720", "--frame_num", "81"])
    lines = capsys.readouterr().out.splitlines()
    assert "t2v-14B: 1280*720, 81 frames -> 21 x 45 x 80 = 75,600 tokens" in lines[1]
    rows = {line.split()[0]: line.split() for line in lines[3:7]}
    assert rows["1"][1] == "75,600" and rows["2"][1] == "37,800" and rows["8"][1] == "9,450"
    assert rows["1"][5] == "0" and float(rows["8"][4]) < float(rows["1"][4]) / 4  # a2a, activations per rank
    assert "not possible: 12 heads are not divisible by 8" in lines[-1]


if __name__ == "__main__":
    sp_worker(sys.argv[1])
