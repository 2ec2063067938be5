"""Flow-matching samplers: official solver trajectories (every case in the reference `samplers/`
folder and in the folders of `WAN_SAMPLER_DIR`), Euler convergence, the few-step schedule, state
reset and argument checks. `pytest -k sampler` selects them all."""

import math

import pytest
import torch

from golden_kinds import REFERENCE_DIR, assert_close, case_files, load_case
from wan.samplers import get_sampler

SAMPLER_CASES = case_files([REFERENCE_DIR / "samplers"], "WAN_SAMPLER_DIR")


def analytic_model(A, B):
    """The fixed "model" of the reference trajectories: v(x, t) = A * x + B * (t / 1000)."""
    return lambda x, t: A * x + B * (t / 1000)


def run(sampler, model, x, generator=None):
    """[steps + 1, ...] latents: the start and the result of every step."""
    xs = [x]
    for t in sampler.timesteps:
        x = sampler.step(model(x, t), t, x, generator=generator)
        xs.append(x)
    return torch.stack(xs)


def random_problem(shape=(2, 4, 3, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    A = -0.5 - 0.5 * torch.rand(shape, generator=g)  # bounded away from 0 for the closed form below
    return A, torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_sampler_reference_cases_present():
    assert SAMPLER_CASES, (f"no sampler cases in {REFERENCE_DIR / 'samplers'}; "
                           "is ../shared/reference beside the checkout?")


@pytest.mark.parametrize("path", SAMPLER_CASES, ids=[p.stem for p in SAMPLER_CASES])
def test_sampler_matches_reference(path):
    case = load_case(path)
    meta = case.meta
    sampler = get_sampler(meta["solver"], num_steps=meta["steps"], shift=meta["shift"],
                          num_train_timesteps=meta["num_train_timesteps"])
    assert_close(sampler.timesteps, case.outputs["timesteps"], name="timesteps")
    xs = run(sampler, analytic_model(case.inputs["A"], case.inputs["B"]), case.inputs["x_T"])
    assert xs.shape == case.outputs["x"].shape
    for i, (ours, ref) in enumerate(zip(xs, case.outputs["x"])):
        assert_close(ours, ref, name=f"x[{i}]")


def test_sampler_euler_converges_to_exact_ode_solution():
    # With t = 1000 * sigma the flow ODE is dx/dsigma = A x + B sigma, integrated from x(1) = x_T to
    # sigma = 0. Particular solution -B sigma / A - B / A^2, hence
    # x(0) = (x_T + B / A + B / A^2) e^-A - B / A^2.
    A, B, x_T = random_problem()
    exact = (x_T + B / A + B / A**2) * torch.exp(-A) - B / A**2
    errors = []
    for steps in (10, 100, 1000):
        sampler = get_sampler("euler", num_steps=steps, shift=3.0)
        errors.append((run(sampler, analytic_model(A, B), x_T)[-1] - exact).abs().max().item())
    # First order: error shrinks about tenfold per tenfold steps.
    assert errors[1] < errors[0] / 5 and errors[2] < errors[1] / 5, errors
    assert errors[2] < 1e-3 * exact.abs().max().item(), errors


def test_sampler_few_step_warped_timesteps():
    # Self-Forcing's warp_denoising_step: t -> 1000 * sigma' with sigma = t / 1000 and
    # sigma' = 5 sigma / (1 + 4 sigma). 1000 -> 1000; 750 -> 1000 * 3.75 / 4 = 937.5;
    # 500 -> 1000 * 2.5 / 3 = 833.33; 250 -> 1000 * 1.25 / 2 = 625.
    sampler = get_sampler("few_step", denoising_step_list=[1000, 750, 500, 250], shift=5.0)
    assert_close(sampler.timesteps, torch.tensor([1000.0, 937.5, 2500 / 3, 625.0]), atol=1e-3)
    assert_close(sampler.sigmas, torch.tensor([1.0, 0.9375, 2.5 / 3, 0.625, 0.0]), atol=1e-6)
    assert_close(get_sampler("few_step", num_steps=4, shift=5.0).timesteps, sampler.timesteps, atol=0)
    unwarped = get_sampler("few_step", denoising_step_list=[1000, 750, 500, 250], warp=False)
    assert_close(unwarped.timesteps, torch.tensor([1000.0, 750.0, 500.0, 250.0]), atol=0)


def test_sampler_few_step_renoises_predicted_x0():
    A, B, x_T = random_problem()
    model = analytic_model(A, B)
    sampler = get_sampler("few_step", denoising_step_list=[1000, 750, 500, 250], shift=5.0)
    xs = run(sampler, model, x_T, generator=torch.Generator().manual_seed(7))

    noise_g = torch.Generator().manual_seed(7)
    x = x_T
    for i, t in enumerate(sampler.timesteps):
        sigma = t.item() / 1000
        x0 = x - sigma * model(x, t)
        if i == len(sampler.timesteps) - 1:
            x = x0
        else:
            next_sigma = sampler.timesteps[i + 1].item() / 1000
            x = (1 - next_sigma) * x0 + next_sigma * torch.randn(x.shape, generator=noise_g)
        assert_close(xs[i + 1], x, atol=1e-5, name=f"x[{i + 1}]")


@pytest.mark.parametrize("name", ["unipc", "dpm++"])
def test_sampler_multistep_repeatable(name):
    A, B, x_T = random_problem()
    model = analytic_model(A, B)
    sampler = get_sampler(name, num_steps=8, shift=5.0)
    first = run(sampler, model, x_T)
    again = run(sampler, model, x_T)  # restarting at step 0 drops the history
    assert torch.equal(first, again)

    # Calling by step index, and resuming mid-schedule after reset(), follow the same trajectory.
    sampler.reset()
    x = x_T
    for i, t in enumerate(sampler.timesteps[:3]):
        x = sampler.step(model(x, t), i, x)
    assert torch.equal(x, first[3])
    sampler.reset()
    resumed = sampler.step(model(x, sampler.timesteps[3]), 3, x)
    fresh = get_sampler(name, num_steps=8, shift=5.0)
    assert torch.equal(resumed, fresh.step(model(x, fresh.timesteps[3]), 3, x))


def test_sampler_multistep_rejects_skipped_step():
    sampler = get_sampler("unipc", num_steps=4, shift=5.0)
    x = torch.randn(1, 2, 3)
    sampler.step(x, 0, x)
    with pytest.raises(ValueError, match="reset"):
        sampler.step(x, 2, x)


def test_sampler_helpers():
    sampler = get_sampler("dpm++", num_steps=10, shift=5.0)
    x0, noise = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    t = sampler.timesteps[[2, 5]]
    sigma = sampler.sigmas[[2, 5]].reshape(2, 1, 1)
    x_t = sampler.add_noise(x0, noise, t)
    assert_close(x_t, (1 - sigma) * x0 + sigma * noise, atol=1e-6)
    # The flow target v = noise - x0 maps back to x0.
    assert_close(sampler.to_x0(noise - x0, x_t, t), x0, atol=1e-5)
    assert_close(sampler.add_noise(x0, noise, 0), x0, atol=0)  # timestep 0 is the clean end point
    assert sampler.num_steps == 10 and sampler.sigmas.shape == (11,) and sampler.sigmas[-1] == 0
    assert math.isclose(sampler.sigmas[0].item(), 1.0)


@pytest.mark.parametrize("kwargs", [
    dict(name="ddim", num_steps=10),
    dict(name="unipc", num_steps=0),
    dict(name="euler", num_steps=None),
    dict(name="few_step"),
    dict(name="few_step", denoising_step_list=[750, 1000]),
    dict(name="few_step", denoising_step_list=[1000, 500], num_steps=3),
])
def test_sampler_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        get_sampler(**kwargs)
