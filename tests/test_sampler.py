"""The Karras ladder and the second-order multistep solver, checked against an exact ODE solution."""

from __future__ import annotations

import math

import pytest
import torch

from cosmos_policy.sampler import karras_sigmas, sample, seeded_noise


def test_karras_ladders_from_the_method_sheet():
    five = karras_sigmas(5, 4.0, 80.0, 7.0)
    assert five.dtype == torch.float64
    assert torch.allclose(five, torch.tensor([80.0, 42.29, 20.97, 9.62, 4.0], dtype=torch.float64), atol=0.01)
    ten = karras_sigmas(10, 4.0, 80.0)
    expected = [80, 60.7, 45.5, 33.7, 24.7, 17.8, 12.6, 8.8, 6.0, 4]
    assert torch.allclose(ten, torch.tensor(expected, dtype=torch.float64), atol=0.06)
    assert karras_sigmas(1, 4.0, 80.0).tolist() == [80.0]


@pytest.mark.parametrize("steps", [1, 2, 5, 10])
@pytest.mark.parametrize("solver", ["2ab", "euler"])
def test_steps_count_network_evaluations(steps, solver):
    calls = []

    def x0_fn(x, sigma, rows):
        calls.append(float(sigma[0]))
        return torch.zeros_like(x)

    sample(x0_fn, torch.randn(2, 3), steps=steps, solver=solver)
    assert len(calls) == steps
    assert calls[0] == 80.0 and calls[-1] == (4.0 if steps > 1 else 80.0)
    assert calls == karras_sigmas(steps, 4.0, 80.0).tolist()


def _gaussian_problem(mu=0.7, s=0.5):
    """Data N(mu, s^2): x0(x, sigma) is exact and the probability-flow ODE has a closed form."""

    def x0_fn(x, sigma, rows=None):
        sig = sigma.view(-1, *[1] * (x.dim() - 1))
        return mu + s**2 / (s**2 + sig**2) * (x - mu)

    def exact(x_max, sigma_max, sigma_end):
        x_end = mu + (x_max - mu) * math.sqrt((s**2 + sigma_end**2) / (s**2 + sigma_max**2))
        return x0_fn(x_end, torch.full((x_max.shape[0],), sigma_end, dtype=torch.float64))

    return x0_fn, exact


def test_second_order_solver_converges_faster_than_euler():
    x0_fn, exact = _gaussian_problem()
    noise = torch.randn(64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    truth = exact(noise * 80.0, 80.0, 4.0)
    err = {}
    for solver in ("euler", "2ab"):
        for steps in (5, 10, 20, 40):
            out = sample(x0_fn, noise, steps=steps, solver=solver)
            err[solver, steps] = float((out - truth).abs().max())
    for steps in (5, 10, 20, 40):
        assert err["2ab", steps] < err["euler", steps]
    # Second order: halving the step roughly quarters the error; first order roughly halves it.
    assert err["2ab", 20] / err["2ab", 40] > 3.0
    assert 1.5 < err["euler", 20] / err["euler", 40] < 2.6
    assert err["2ab", 40] < 1e-3


def test_sampling_is_deterministic_for_a_seed():
    x0_fn, _ = _gaussian_problem()
    a = sample(x0_fn, seeded_noise((3, 2), [5, 6]), steps=5)
    b = sample(x0_fn, seeded_noise((3, 2), [5, 6]), steps=5)
    assert torch.equal(a, b)
    n = seeded_noise((3, 2), [5, 6, 5])
    assert torch.equal(n[0], n[2]) and not torch.equal(n[0], n[1])


def test_bad_arguments():
    with pytest.raises(ValueError, match="solver"):
        sample(lambda x, s, r: x, torch.zeros(1, 1), steps=2, solver="heun")
    with pytest.raises(ValueError, match="steps"):
        sample(lambda x, s, r: x, torch.zeros(1, 1), steps=0)
    with pytest.raises(ValueError, match="steps"):
        sample(lambda x, s, r: x, torch.zeros(2, 1), steps=[1, 2, 3])
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        karras_sigmas(3, 80.0, 4.0)


@pytest.mark.parametrize("solver", ["2ab", "euler"])
def test_rows_with_different_step_counts_share_one_loop(solver):
    """The planner's ensembles (1, 3, 5 steps) in one batched loop give each row its own result."""
    x0_fn, _ = _gaussian_problem()
    noise = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    batch_sizes = []

    def counting(x, sigma, rows):
        batch_sizes.append(len(rows))
        return x0_fn(x, sigma)

    mixed = sample(counting, noise, steps=[1, 3, 5], solver=solver)
    assert batch_sizes == [3, 2, 2, 1, 1]  # 5 batched evaluations instead of 9 single ones
    for i, n in enumerate([1, 3, 5]):
        alone = sample(x0_fn, noise[i : i + 1], steps=n, solver=solver)
        assert torch.equal(mixed[i : i + 1], alone)
