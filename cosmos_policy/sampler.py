"""Sampling: a Karras rho = 7 sigma ladder and the official second-order multistep solver.

``steps`` counts network evaluations, as Cosmos Policy's sampler does (method 4.1): for
steps >= 2 the ladder has ``steps`` points from sigma_max down to sigma_min, the solver takes
steps - 1 steps along it, and a final evaluation at sigma_min returns its x0 ("sample clean").
steps = 1 is a single x0 prediction at sigma_max from pure noise. For 5 steps the ladder is
80, 42.3, 21.0, 9.6, 4.

The "2ab" solver is the exponential integrator of the probability-flow ODE written in
lambda = -ln(sigma) with x0 prediction (RES, arXiv 2308.02157): dx/dlambda = x0(x) - x, so over
a step of length h, x_next = e^{-h} x + h [b1 x0_now + b2 x0_prev], where x0 is linearly
extrapolated in lambda from the previous evaluation (Adams-Bashforth): b1 = phi1(-h) - phi2(-h)/c,
b2 = phi2(-h)/c, c = (lambda_prev - lambda_now)/h. The first step has no history and is the
exact-in-x0 Euler step x_next = (s_next/s) x + (1 - s_next/s) x0. The solver's arithmetic is
float64, as in the official sampler.

Known difference from the official code: its sampler subtracts one step before building the
ladder and then treats the result 1 as the single-evaluation case, so asking it for 2 steps gives
1 evaluation; here 2 steps give 2 evaluations (80 then 4).
"""

from __future__ import annotations

from typing import Callable

import torch

# x0_fn(x, sigma, rows): x0 predictions for the batch rows ``rows`` (LongTensor), given their
# float64 latents and (len(rows),) float64 sigmas.
X0Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def karras_sigmas(num_points: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """``num_points`` sigmas from sigma_max to sigma_min, evenly spaced in sigma^(1/rho), float64."""
    if num_points < 1:
        raise ValueError(f"num_points: expected >= 1, got {num_points}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"sigma range: expected 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if num_points == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    ramp = torch.linspace(0.0, 1.0, num_points, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    sigmas[0], sigmas[-1] = sigma_max, sigma_min  # exact ends, not sigma^(1/rho)^rho round-off
    return sigmas


def _phi1(z: torch.Tensor) -> torch.Tensor:
    return torch.expm1(z) / z


def _phi2(z: torch.Tensor) -> torch.Tensor:
    return (_phi1(z) - 1.0) / z


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *[1] * (like.dim() - 1))


def euler_step(x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    ratio = _expand(sigma_next / sigma, x)
    return ratio * x + (1.0 - ratio) * x0


def ab2_step(
    x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, x0_prev: torch.Tensor, sigma_prev: torch.Tensor
) -> torch.Tensor:
    """One 2ab step per row; sigmas are (B,) float64."""
    lam, lam_next, lam_prev = -torch.log(sigma), -torch.log(sigma_next), -torch.log(sigma_prev)
    h = lam_next - lam
    c = (lam_prev - lam) / h
    phi1, phi2 = _phi1(-h), _phi2(-h)
    b1, b2 = phi1 - phi2 / c, phi2 / c
    return _expand(torch.exp(-h), x) * x + _expand(h, x) * (_expand(b1, x) * x0 + _expand(b2, x) * x0_prev)


def sample(
    x0_fn: X0Fn,
    noise: torch.Tensor,
    steps: int | list[int],
    sigma_min: float = 4.0,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    solver: str = "2ab",
) -> torch.Tensor:
    """Integrate from ``noise`` (unit variance; scaled by sigma_max here) to x0.

    ``steps`` is one count for every row or one per row: rows with different counts (the
    planner's ensembles use 1, 3 and 5) share one loop, so each iteration is a single batched
    evaluation of every row that still has one to do. Returns float64 x0 of each row's last
    evaluation.
    """
    if solver not in ("2ab", "euler"):
        raise ValueError(f"solver: expected '2ab' or 'euler', got {solver!r}")
    batch = noise.shape[0]
    per_row = [steps] * batch if isinstance(steps, int) else list(steps)
    if len(per_row) != batch or any(int(n) < 1 for n in per_row):
        raise ValueError(f"steps: expected one count >= 1 or {batch} of them, got {steps}")
    device = noise.device
    ladders = [karras_sigmas(int(n), sigma_min, sigma_max, rho) for n in per_row]
    longest = max(per_row)
    # sigma[k, row] is the row's k-th ladder point; rows past their ladder repeat the last one.
    table = torch.stack([torch.cat([l, l[-1:].expand(longest - len(l))]) for l in ladders], dim=1).to(device)
    counts = torch.tensor(per_row, device=device)
    x = noise.to(torch.float64) * sigma_max
    if len(set(per_row)) == 1:
        return _sample_uniform(x0_fn, x, table, solver)
    out = torch.empty_like(x)
    prev_x0 = torch.zeros_like(x)
    for k in range(longest):
        rows = torch.nonzero(counts > k).squeeze(1)
        sig = table[k, rows]
        x0 = x0_fn(x[rows], sig, rows).to(torch.float64)
        last = counts[rows] == k + 1
        out[rows[last]] = x0[last]
        going = rows[~last]
        if len(going):
            xg, x0g, sg, nxt = x[going], x0[~last], sig[~last], table[k + 1, going]
            if solver == "2ab" and k > 0:
                x[going] = ab2_step(xg, x0g, sg, nxt, prev_x0[going], table[k - 1, going])
            else:
                x[going] = euler_step(xg, x0g, sg, nxt)
            prev_x0[going] = x0g
    return out


def _sample_uniform(x0_fn: X0Fn, x: torch.Tensor, table: torch.Tensor, solver: str) -> torch.Tensor:
    """Every row on one ladder: no row bookkeeping, so nothing waits on the device between steps."""
    rows = torch.arange(x.shape[0], device=x.device)
    steps = table.shape[0]
    prev: tuple[torch.Tensor, torch.Tensor] | None = None
    for k in range(steps):
        x0 = x0_fn(x, table[k], rows).to(torch.float64)
        if k == steps - 1:
            return x0
        if solver == "2ab" and prev is not None:
            x = ab2_step(x, x0, table[k], table[k + 1], prev[0], prev[1])
        else:
            x = euler_step(x, x0, table[k], table[k + 1])
        prev = (x0, table[k])
    raise AssertionError("unreachable: a ladder has at least one point")


def seeded_noise(shape: tuple[int, ...], seeds: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Unit Gaussian noise, one row per seed, drawn on the CPU so a seed gives the same tensor on any device."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float32) for s in seeds]
    return torch.stack(rows).to(device)
