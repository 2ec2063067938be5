"""Distillation (trainers/rollout.py, ode.py, distillation.py, scripts/generate_ode_pairs.py).

- Gradient paths of the self-forcing rollout: autograd reaches each block's exit step and nothing
  else; the KV cache holds no graph; the rollout without truncation is exactly inference.
- A toy with known answers: the teacher is the exact flow of a Gaussian over a 6-frame latent video
  (AR(1) in time, so later blocks must follow earlier ones through the cache). Its sampler's ODE
  trajectories initialize a tiny causal student by ODE regression; then DMD, or SiD, against a critic
  of the same (Gaussian) family, started at the teacher as the fake score starts from a teacher copy.
  The student's 4-step samples are compared with the Gaussian by the Frechet distance.
- train.py end to end on tiny checkpoints: ODE pairs -> ODE init -> DMD / SiD / GAN, 2 processes.
"""

import copy
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import REPO_ROOT, randomize
from pipelines.causal import CausalPipeline
from pipelines.tiny_checkpoint import TINY_T5, make_tiny_checkpoint
from scripts.generate_ode_pairs import main as generate_ode_pairs_main
from scripts.generate_ode_pairs import ode_trajectory
from test_train import losses, run_train_cli

pytestmark = pytest.mark.usefixtures("single_thread")
from trainers.config import ConfigError, dit_config, load_config
from trainers.data import LatentDataset
from trainers.distillation import DistillInputs, ScoreDistillation, ScoreTimesteps, dmd_loss, sid_loss
from trainers.loop import train
from trainers.ode import ode_regression_loss
from trainers.rollout import CausalGenerator, Rollout, student_sampler
from wan.checkpoint import read_state_dict
from wan.model_loading import load_dit
from wan.modules.model import WanModel
from wan.samplers import get_sampler

STEPS = [1000, 750, 500, 250]
C, FRAMES = 4, 6  # toy latents [C, FRAMES, 1, 1]: one token per frame, blocks of 2 frames
TOY_DIT = dict(model_type="t2v", patch_size=(1, 1, 1), in_dim=C, out_dim=C, dim=64, ffn_dim=128, freq_dim=32,
               text_dim=8, text_len=4, num_heads=2, num_layers=2)


def toy_student(random_weights=False):
    """A tiny causal student; `random_weights` everywhere (the default init zeroes some layers)."""
    torch.manual_seed(0)
    model = CausalGenerator(WanModel(**TOY_DIT), num_frame_per_block=2)
    if random_weights:
        randomize(model.model)
    return model


def toy_context(batch):
    return torch.ones(batch, 1, TOY_DIT["text_dim"])


# -- gradient paths -----------------------------------------------------------------------------------

class ForwardLog:
    """Records every forward of a model: (start frame, timestep, grad enabled), and whether backward
    reached its output."""

    def __init__(self, model):
        self.calls = []
        model.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, output):
        call = {"start": kwargs.get("start", 0), "t": args[1][0].item(), "grad": torch.is_grad_enabled(),
                "reached": False}
        self.calls.append(call)
        if output.requires_grad:
            output.register_hook(lambda grad: call.update(reached=bool(grad.abs().sum() > 0)))


def uses_of(root, param):
    """How many times the autograd graph below `root` feeds into `param`."""
    seen, stack, count = set(), [root.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is not None and getattr(child, "variable", None) is param:
                count += 1
            stack.append(child)
    return count


@pytest.mark.parametrize("same_step", [False, True])
def test_distill_self_forcing_gradient_only_through_exit_steps(same_step):
    model = toy_student(random_weights=True)
    log = ForwardLog(model)
    rollout = Rollout("self_forcing", STEPS, same_step_across_blocks=same_step, context_noise=100)
    g = torch.Generator().manual_seed(3)
    out = rollout(model, toy_context(2), (2, C, FRAMES, 1, 1), generator=g)
    timesteps = rollout.sampler.timesteps.tolist()
    assert len(set(out.exit_steps)) == 1 or not same_step
    # each block: its steps up to the exit, the exit the only one recorded, then the cache rerun at context_noise
    expected = []
    for block, exit_step in enumerate(out.exit_steps):
        expected += [(2 * block, timesteps[i], i == exit_step) for i in range(exit_step + 1)]
        if block < 2:
            expected.append((2 * block, 100.0, False))
    assert [(c["start"], pytest.approx(c["t"]), c["grad"]) for c in log.calls] == expected

    out.video.square().mean().backward()
    assert [c["reached"] for c in log.calls] == [c["grad"] for c in log.calls]
    # one use of the patch embedding per block in the whole graph: no path through other steps or the cache
    assert uses_of(out.video, model.model.patch_embedding.weight) == 3
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.model.blocks.parameters())


def test_distill_kv_cache_holds_no_graph_and_checkpointing_gives_the_same_gradient():
    grads = []
    for checkpointing in (False, True):
        model = toy_student(random_weights=True)
        model.model.set_gradient_checkpointing(checkpointing)
        caches = []
        new_cache = model.new_kv_cache
        model.new_kv_cache = lambda n: caches.append(new_cache(n)) or caches[-1]
        rollout = Rollout("self_forcing", STEPS, same_step_across_blocks=False)
        out = rollout(model, toy_context(2), (2, C, FRAMES, 1, 1), generator=torch.Generator().manual_seed(5))
        for layer in caches[0].layers:
            assert not layer.k.requires_grad and layer.k.grad_fn is None and not layer.v.requires_grad
        out.video.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_distill_rollout_without_truncation_is_inference():
    """last_step_only: the rollout draws the same noise in the same order as CausalPipeline and makes the
    same video; with gradients on, it differs only by rounding."""
    model = toy_student(random_weights=True)
    rollout = Rollout("self_forcing", STEPS, last_step_only=True)
    video = rollout(model, toy_context(3), (3, C, FRAMES, 1, 1), generator=torch.Generator().manual_seed(7)).video
    pipe = CausalPipeline.few_step(model, STEPS)
    blocks = pipe.generate(toy_context(3), FRAMES, (1, 1), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(video.detach(), torch.cat(list(blocks), dim=2), atol=1e-5, rtol=1e-5)


def test_distill_losses_have_the_published_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 2, 2, generator=g, requires_grad=True)
    real, fake = torch.randn(2, *x.shape, generator=g)
    loss, _ = dmd_loss(x, real, fake)
    loss.backward()
    normalizer = (x - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    torch.testing.assert_close(x.grad, ((fake - real) / normalizer / x.numel()).detach())
    # SiD at alpha = 0.5 with the scores held fixed: d/dx of (r - f)(r - x) / n is -(r - f) / n per element
    x.grad = None
    sid_loss(x, real, fake, 0.5).backward()
    torch.testing.assert_close(x.grad, (-(real - fake) / normalizer / x.numel()).detach())


# -- the toy: a Gaussian teacher ------------------------------------------------------------------------

def toy_gaussian():
    """Mean and covariance of the toy data, flattened [C * FRAMES]: per channel a mean and a scale, an
    AR(1) correlation 0.8 across frames."""
    lag = (torch.arange(FRAMES)[:, None] - torch.arange(FRAMES)[None]).abs()
    scales = torch.tensor([0.6, 1.0, 0.4, 0.8], dtype=torch.float64)
    cov = torch.block_diag(*[s ** 2 * 0.8 ** lag.double() for s in scales])
    mean = torch.tensor([0.8, -0.5, 0.3, 0.0], dtype=torch.float64).repeat_interleave(FRAMES)
    return mean, cov


class GaussianFlow(nn.Module):
    """The exact flow of data N(mean, factor factor^T) under x_t = (1 - s) x0 + s noise:
    E[x0 | x_t] = mean + (1 - s) cov ((1 - s)^2 cov + s^2 I)^-1 (x_t - (1 - s) mean), v = (x_t - x0) / s.
    Frozen, the teacher; trainable, a critic that can represent any Gaussian."""

    def __init__(self, mean, cov, trainable=False):
        super().__init__()
        self.mean = nn.Parameter(mean.float().clone(), requires_grad=trainable)
        self.factor = nn.Parameter(torch.linalg.cholesky(cov).float(), requires_grad=trainable)

    def cov(self):
        return self.factor @ self.factor.T

    def forward(self, x, t, context):
        s = (t.float() / 1000).reshape(-1, 1)
        x_t = x.reshape(len(x), -1)
        cov = self.cov()
        eye = torch.eye(len(cov))
        system = (1 - s[:, :, None]) ** 2 * cov + s[:, :, None] ** 2 * eye
        centered = (x_t - (1 - s) * self.mean)[:, :, None]
        x0 = self.mean + (1 - s) * (cov @ torch.linalg.solve(system, centered))[:, :, 0]
        return ((x_t - x0) / s).reshape(x.shape)


def frechet(samples, mean, cov):
    """Frechet distance between the Gaussian fit of samples [N, ...] and N(mean, cov)."""
    x = samples.reshape(len(samples), -1).double()
    m, c = x.mean(0), torch.cov(x.T)
    values, vectors = torch.linalg.eigh(c)
    root = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root @ cov @ root).clamp(min=0).sqrt().sum()
    return ((m - mean) ** 2).sum().item() + (c.trace() + cov.trace() - 2 * cross).item()


def student_samples(model, n=2048, seed=123):
    pipe = CausalPipeline.few_step(model, STEPS)
    with torch.no_grad():
        blocks = pipe.generate(toy_context(n), FRAMES, (1, 1), generator=torch.Generator().manual_seed(seed))
        return torch.cat(list(blocks), dim=2)


def test_ode_trajectory_follows_the_exact_gaussian_flow():
    """For Gaussian data the probability-flow ODE is solved in closed form: along each eigenvector of
    the covariance, x_s = (1 - s) mean + sqrt((1 - s)^2 lambda + s^2) noise."""
    mean, cov = toy_gaussian()
    noise = torch.randn(64, C, FRAMES, 1, 1, generator=torch.Generator().manual_seed(0))
    sigmas = Rollout("self_forcing", STEPS).sampler.sigmas[:-1].tolist()
    teacher = GaussianFlow(mean, cov)
    with torch.no_grad():
        states, clean = ode_trajectory(lambda x, t: teacher(x, t.expand(len(x)), None), noise,
                                       get_sampler("unipc", 30, shift=5.0), sigmas)
    values, vectors = torch.linalg.eigh(cov)
    z = noise.reshape(64, -1).double() @ vectors
    # the states at the student's levels (Euler sub-steps between solver steps) are the ODE's; the end
    # carries the solver's own error of its last, first-order step into sigma = 0
    for s, state, atol in zip(sigmas + [0.0], list(states) + [clean], [1e-6, 5e-3, 5e-3, 5e-3, 0.15]):
        exact = (1 - s) * mean + (((1 - s) ** 2 * values + s ** 2).sqrt() * z) @ vectors.T
        torch.testing.assert_close(state.reshape(64, -1).double(), exact, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def toy():
    """The Gaussian teacher, its ODE pairs and the student before and after ODE initialization."""
    mean, cov = toy_gaussian()
    teacher = GaussianFlow(mean, cov)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2048, C, FRAMES, 1, 1, generator=g)
    schedule = Rollout("self_forcing", STEPS).sampler
    with torch.no_grad():
        trajectory, clean = ode_trajectory(lambda x, t: teacher(x, t.expand(len(x)), None), noise,
                                           get_sampler("unipc", 50, shift=5.0), schedule.sigmas[:-1].tolist())
    trajectory = trajectory.transpose(0, 1)  # [N, S, C, F, 1, 1]
    student = toy_student()
    before = frechet(student_samples(student), mean, cov)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0)
    for _ in range(150):
        pick = torch.randint(len(noise), (64,), generator=g)
        loss = ode_regression_loss(student, trajectory[pick], clean[pick], toy_context(64), schedule, g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return dict(mean=mean, cov=cov, teacher=teacher, student=student, before=before,
                teacher_fd=frechet(clean, mean, cov), after_ode=frechet(student_samples(student), mean, cov))


def distill(toy, distribution_loss, generator_steps=60, ratio=5, batch=64):
    """Score distillation of a copy of the ODE-initialized student, 5 critic updates per generator
    update; returns its samples' distance (DMD and SiD over three seeds: 0.77 to 1.12, from 1.99)."""
    student = copy.deepcopy(toy["student"])
    critic = GaussianFlow(toy["mean"], toy["cov"], trainable=True)
    method = ScoreDistillation(Rollout("self_forcing", STEPS), toy["teacher"], distribution_loss,
                               timesteps=ScoreTimesteps(shift=5.0))
    optimizers = {"generator": torch.optim.AdamW(student.parameters(), 1e-4, (0.0, 0.999), weight_decay=0),
                  "critic": torch.optim.AdamW(critic.parameters(), 1e-2, (0.0, 0.999), weight_decay=0)}
    g = torch.Generator().manual_seed(1)
    inputs = DistillInputs(toy_context(batch), None, (batch, C, FRAMES, 1, 1))
    for step in range(generator_steps * (ratio + 1)):
        phase = "generator" if step % (ratio + 1) == 0 else "critic"
        turn = method.generator_loss if phase == "generator" else method.critic_loss
        loss, _ = turn(student, critic, inputs, g)
        optimizers[phase].zero_grad()
        loss.backward()
        optimizers[phase].step()
    return frechet(student_samples(student), toy["mean"], toy["cov"])


def test_distill_toy_ode_init_learns_the_teacher(toy):
    assert toy["teacher_fd"] < 0.2  # the teacher's own samples (2048 of them: the estimate's floor)
    assert toy["after_ode"] < toy["before"] / 5, (toy["before"], toy["after_ode"])


def test_distill_toy_dmd_matches_teacher_statistics(toy):
    after = distill(toy, "dmd")
    print(f"Frechet distance to the teacher's Gaussian: random student {toy['before']:.2f}, "
          f"ODE init {toy['after_ode']:.2f}, + DMD {after:.2f} (teacher samples {toy['teacher_fd']:.2f})")
    assert after < toy["before"] / 20 and after < 0.75 * toy["after_ode"]


def test_distill_toy_sid_matches_teacher_statistics(toy):
    after = distill(toy, "sid")
    print(f"Frechet distance to the teacher's Gaussian: random student {toy['before']:.2f}, "
          f"ODE init {toy['after_ode']:.2f}, + SiD {after:.2f} (teacher samples {toy['teacher_fd']:.2f})")
    assert after < toy["before"] / 20 and after < 0.75 * toy["after_ode"]


# -- train.py end to end on tiny checkpoints ------------------------------------------------------------

CONFIGS = REPO_ROOT / "configs"
PROMPTS = ["a red square moving left", "a blue ball bouncing", "waves on a beach", "a cat on a sofa"]


def teacher_overrides(ckpt):
    """Config overrides that take the tiny checkpoint's DiT as teacher and fake score, its umT5 as encoder."""
    return [f"distill.real_score.checkpoint={ckpt / 'diffusion_pytorch_model.safetensors'}",
            f"distill.fake_score.checkpoint={ckpt / 'diffusion_pytorch_model.safetensors'}",
            f"encoders.t5_checkpoint={ckpt / 'models_t5_umt5-xxl-enc-bf16.pth'}",
            f"encoders.t5_tokenizer={ckpt / 'google' / 'umt5-xxl'}"] + [
        f"encoders.t5_config.{k}={v}" for k, v in TINY_T5.items()]


@pytest.fixture(scope="module")
def distill_run(tmp_path_factory):
    """A tiny t2v teacher checkpoint, its ODE pairs for four prompts, and an ODE-initialized student."""
    root = tmp_path_factory.mktemp("distill")
    ckpt = make_tiny_checkpoint("t2v", root / "teacher")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    pairs = root / "ode_pairs"
    args = ["--checkpoint_dir", ckpt, "--prompts", prompts, "--output_dir", pairs, "--size", "64*64",
            "--frame_num", "9", "--guide_scale", "3.0"]
    generate_ode_pairs_main(list(map(str, args)))
    ode_history = train(load_config(CONFIGS / "tests" / "tiny_ode.yaml", [f"data.path={pairs}"]), root / "ode")
    student = root / "ode" / "checkpoints" / "step_000020" / "model.safetensors"
    return SimpleNamespace(root=root, ckpt=ckpt, prompts=prompts, pairs=pairs, args=args, ode_history=ode_history,
                           student=student)


def sample_of(folder, index):
    return LatentDataset(folder).load(index, epoch=0)


def test_ode_pairs_are_a_resumable_latents_dataset(distill_run):
    files = sorted(distill_run.pairs.glob("*.safetensors"))
    assert [f.name for f in files] == [f"{i:06d}.safetensors" for i in range(len(PROMPTS))]
    sample = sample_of(distill_run.pairs, 2)
    assert sample["text"] == PROMPTS[2]
    assert sample["latents"].shape == (16, 3, 8, 8) and sample["trajectory"].shape == (4, 16, 3, 8, 8)
    torch.testing.assert_close(sample["timesteps"], Rollout("self_forcing", STEPS).sampler.timesteps)
    assert sample["context"].shape[1] == 32
    original, stamps = sample_of(distill_run.pairs, 1), [f.stat().st_mtime_ns for f in files]
    files[1].unlink()  # an interrupted run: only the missing file is made again, the same
    generate_ode_pairs_main(list(map(str, distill_run.args)))
    assert [f.stat().st_mtime_ns for f in files[:1] + files[2:]] == stamps[:1] + stamps[2:]
    again = sample_of(distill_run.pairs, 1)
    assert again["text"] == original["text"]
    for key in ("latents", "trajectory", "context"):
        torch.testing.assert_close(again[key], original[key])


def test_ode_init_trains_the_student(distill_run):
    loss = [r["loss"] for r in distill_run.ode_history]
    assert np.mean(loss[-5:]) < 0.8 * np.mean(loss[:5]), loss
    student = load_dit(distill_run.student)
    assert len(student.blocks) == 2 and student.dim == 32


def run_paths(name, run):
    """Overrides that complete a tiny config: its data and, for distillation, student and teacher."""
    if name in ("tiny_t2v.yaml", "tiny_ode.yaml"):
        return [f"data.path={run.pairs}"]
    data = run.prompts if name in ("tiny_dmd.yaml", "tiny_sid.yaml") else run.pairs
    return [f"data.path={data}", f"model.checkpoint={run.student}", *teacher_overrides(run.ckpt)]


def distill_config(name, run, *overrides):
    return load_config(CONFIGS / "tests" / name, [*run_paths(name, run), *overrides])


@pytest.fixture(scope="module")
def dmd_run(distill_run, tmp_path_factory):
    logdir = tmp_path_factory.mktemp("dmd")
    return SimpleNamespace(history=train(distill_config("tiny_dmd.yaml", distill_run), logdir),
                           final=logdir / "checkpoints" / "step_000006")


def test_dmd_trainer_takes_turns_and_exports(distill_run, dmd_run):
    # ratio 2: steps 1, 4 train the generator, the others the critic
    assert [("generator_loss" in r, "critic_loss" in r) for r in dmd_run.history] == [
        (True, False), (False, True), (False, True)] * 2
    assert all(np.isfinite(r["loss"]) and r["dmd_grad"] > 0 for r in dmd_run.history if "generator_loss" in r)
    assert [r["lr"] for r in dmd_run.history] == [1e-4, 1e-3, 1e-3] * 2  # optimizer.lr, distill.lr_critic
    generator = load_dit(dmd_run.final / "model.safetensors")
    initial = load_dit(distill_run.student)
    assert any(not torch.equal(a, b) for a, b in zip(generator.parameters(), initial.parameters()))
    critic = read_state_dict(dmd_run.final / "critic.safetensors")
    assert set(critic) == set(load_dit(distill_run.ckpt / "diffusion_pytorch_model.safetensors").state_dict())


def test_dmd_export_generates_with_inference_py(distill_run, dmd_run, tmp_path):
    config = tmp_path / "student.yaml"
    config.write_text(f"denoising_step_list: {STEPS}\nnum_frame_per_block: 1\nnum_output_frames: 3\n"
                      f"generator_ckpt: {dmd_run.final}\nuse_ema: true\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A boat on a lake.\n")
    result = subprocess.run([sys.executable, str(REPO_ROOT / "inference.py"), "--task", "t2v", "--checkpoint_dir",
                             str(distill_run.ckpt), "--data_path", str(prompts), "--output_folder",
                             str(tmp_path / "out"), "--config_path", str(config)], capture_output=True, text=True,
                            cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((tmp_path / "out").glob("*.mp4"))) == 1


def test_sid_generator_turn_leaves_the_critic_alone(distill_run, tmp_path):
    """SiD's generator loss backpropagates through the fake score: its gradients must not update it."""
    history = train(distill_config("tiny_sid.yaml", distill_run, "train.max_steps=1", "checkpoint.every=1"),
                    tmp_path)
    assert "generator_loss" in history[0] and np.isfinite(history[0]["loss"])
    final = tmp_path / "checkpoints" / "step_000001"
    teacher = load_dit(distill_run.ckpt / "diffusion_pytorch_model.safetensors").state_dict()
    critic = read_state_dict(final / "critic.safetensors")
    assert all(torch.equal(critic[k], teacher[k]) for k in teacher)
    student = load_dit(distill_run.student).state_dict()
    assert any(not torch.equal(v, student[k]) for k, v in load_dit(final / "model.safetensors").state_dict().items())


def test_sid_trainer_runs(distill_run, tmp_path):
    history = train(distill_config("tiny_sid.yaml", distill_run, "train.max_steps=3"), tmp_path)
    assert len(history) == 3 and all(np.isfinite(r["loss"]) for r in history)


@pytest.mark.parametrize("rollout", ["diffusion_forcing", "teacher_forcing"])
def test_distill_forcing_baselines_run(distill_run, tmp_path, rollout):
    history = train(distill_config("tiny_dmd.yaml", distill_run, f"data.path={distill_run.pairs}", "data.kind=latents",
                                   f"distill.rollout={rollout}", "train.max_steps=3"), tmp_path)
    assert len(history) == 3 and all(np.isfinite(r["loss"]) for r in history)


def test_distill_gan_trainer_runs(distill_run, tmp_path):
    history = train(distill_config("tiny_gan.yaml", distill_run), tmp_path)
    assert [("generator_loss" in r) for r in history] == [True, False, True, False]
    assert all(np.isfinite(r["loss"]) for r in history)
    critic = read_state_dict(tmp_path / "checkpoints" / "step_000004" / "critic.safetensors")
    assert {"queries", "head.3.weight", "model.head.head.weight"} <= set(critic)


def test_dmd_trainer_on_two_processes(distill_run, tmp_path):
    """torchrun (gloo): FSDP-sharded generator, critic, teacher and umT5; every rank runs the same
    forwards (the exit steps come from rank 0)."""
    overrides = [*run_paths("tiny_dmd.yaml", distill_run), "train.max_steps=3", "checkpoint.every=3"]
    proc = run_train_cli(["--config_path", CONFIGS / "tests" / "tiny_dmd.yaml", "--logdir", tmp_path, *overrides],
                         nproc=2)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-3000:]
    records = losses(tmp_path)
    assert sorted(records) == [1, 2, 3] and all(np.isfinite(list(records.values())))
    assert (tmp_path / "checkpoints" / "step_000003" / "model.safetensors").exists()


def test_dmd_trainer_resumes_exactly(distill_run, tmp_path):
    """Both networks, both parameter groups of the optimizer and the EMA come back from a checkpoint."""
    straight = train(distill_config("tiny_dmd.yaml", distill_run, "train.max_steps=4", "checkpoint.every=2"),
                     tmp_path / "straight")
    train(distill_config("tiny_dmd.yaml", distill_run, "train.max_steps=2", "checkpoint.every=2"), tmp_path / "resumed")
    resumed = train(distill_config("tiny_dmd.yaml", distill_run, "train.max_steps=4", "checkpoint.every=2"),
                    tmp_path / "resumed", resume="latest")
    assert [r["step"] for r in resumed] == [3, 4]
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in straight[2:]], rtol=1e-5)
    for name in ("model.safetensors", "model_ema.safetensors", "critic.safetensors"):
        a, b = (read_state_dict(tmp_path / run / "checkpoints" / "step_000004" / name)
                for run in ("straight", "resumed"))
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name


@pytest.mark.parametrize("name", ["self_forcing_dmd_train.yaml", "self_forcing_sid_train.yaml", "ode_init.yaml"])
def test_distill_shipped_configs_validate(name, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat on a sofa\n")
    data = prompts if name.startswith("self_forcing") else tmp_path
    cfg = load_config(CONFIGS / name, [f"data.path={data}", "encoders.t5_checkpoint=t5.pth",
                                       "encoders.t5_tokenizer=umt5-xxl"], world_size=8)
    assert cfg.model.preset == "t2v-1.3B" and cfg.causal.num_frame_per_block == 3
    with torch.device("meta"):
        student = CausalGenerator(WanModel.from_config(dit_config(cfg.model)), cfg.causal.num_frame_per_block)
    assert student.block_sizes((cfg.data.num_frames - 1) // 4 + 1) == [3] * 7  # 81 frames: 21 latent frames
    assert student_sampler(cfg).timesteps.tolist() == pytest.approx([1000, 937.5, 833.333, 625], abs=1e-3)
    if cfg.trainer == "score_distillation":
        assert (cfg.data.height // 8, cfg.data.width // 8) == (60, 104)
        assert cfg.distill.real_score.preset == ("t2v-14B" if "dmd" in name else "t2v-1.3B")


BAD_CONFIGS = [
    ("tiny_dmd.yaml", ["distill.rollout=teacher_forcing"], "rollout teacher_forcing needs clean latents"),
    ("tiny_dmd.yaml", ["distill.distribution_loss=kl"], "unknown distill.distribution_loss 'kl'"),
    ("tiny_dmd.yaml", ["distill.rollout=self_forcingg"], "unknown distill.rollout 'self_forcingg'"),
    ("tiny_dmd.yaml", ["distill.lr_critc=1"], "unknown config key"),
    ("tiny_dmd.yaml", ["encoders.t5_checkpoint=null"], "set encoders.t5_checkpoint and t5_tokenizer"),
    ("tiny_dmd.yaml", ["distill.denoising_step_list=[250,500]"], "distill.denoising_step_list: "),
    ("tiny_gan.yaml", ["data.kind=prompts"], "gan with rollout self_forcing needs clean latents"),
    ("tiny_ode.yaml", ["causal.enabled=false"], "the ode trainer trains the causal student"),
    ("tiny_t2v.yaml", ["distill.rollout=self_forcing"], "unknown config key"),  # no distill section elsewhere
]


@pytest.mark.parametrize("name,overrides,message", BAD_CONFIGS)
def test_distill_bad_config_is_one_clear_error(distill_run, name, overrides, message):
    with pytest.raises(ConfigError) as error:
        distill_config(name, distill_run, *overrides)
    assert message in str(error.value)
    assert str(error.value).count("\n  - ") <= 1  # exactly the one problem
