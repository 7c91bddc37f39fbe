"""L-BFGS over several independent smooth problems at once, warm-startable with another problem's curvature memory.

Every head keeps its own curvature history, step size and convergence test, so solving H problems
together gives each the iterates it would get alone; what is shared is the pass over the data,
which computes all heads' losses and gradients with one matrix product. Converged heads drop out of
the passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["batched_lbfgs", "LBFGSResult"]


@dataclass
class LBFGSResult:
    x: torch.Tensor  # [H, P] solutions
    loss: torch.Tensor  # [H] final objective values
    iterations: torch.Tensor  # [H] iterations each head took
    converged: torch.Tensor  # [H] max |gradient| <= tol reached
    history: list = field(default_factory=list)  # [(s [H, P], y [H, P], rho [H])], oldest first: the curvature memory


def _two_loop(g: torch.Tensor, history: list, gamma: torch.Tensor, precondition=None) -> torch.Tensor:
    """-H_k g per head from the stored pairs (pairs with rho 0 are skipped for that head), the initial inverse Hessian
    being ``gamma * precondition`` (``gamma`` alone without a preconditioner)."""
    q = g.clone()
    alphas = []
    for s, y, r in reversed(history):
        a = r * (s * q).sum(1)
        q -= a[:, None] * y
        alphas.append(a)
    if precondition is not None:
        q = precondition(q)
    q *= gamma[:, None]
    for (s, y, r), a in zip(history, reversed(alphas)):
        b = r * (y * q).sum(1)
        q += (a - b)[:, None] * s
    return -q


def _line_search(loss_grad, x, f, d, slope, t, active, heads, c1: float, max_backtracks: int):
    """Backtracking Armijo search from step ``t`` for the active heads; returns (x, f, g at the accepted points, stuck)."""
    x_new, f_new, g_new = x.clone(), f.clone(), torch.zeros_like(x)
    pending = active.clone()
    tol_f = 1e-6 * f.abs().clamp_min(1.0)  # float32 loss noise: a step within it is no step
    for _ in range(max_backtracks):
        idx = heads[pending]
        if len(idx) == 0:
            break
        trial = x[idx] + t[idx, None] * d[idx]
        f_t, g_t = loss_grad(trial, idx)
        ok = f_t <= f[idx] + c1 * t[idx] * slope[idx] + tol_f[idx] * (t[idx] < 1e-3)
        done = idx[ok]
        x_new[done], f_new[done], g_new[done] = trial[ok], f_t[ok], g_t[ok]
        pending[done] = False
        t[idx[~ok]] *= 0.5
    return x_new, f_new, g_new, pending


def batched_lbfgs(loss_grad: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]], x0: torch.Tensor, *,
                  tol: float = 1e-4, max_iter: int = 1000, memory: int = 10, c1: float = 1e-4, max_backtracks: int = 30,
                  history: list | None = None, precondition: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  progress: Callable[[int, int], None] | None = None) -> LBFGSResult:
    """Minimise H problems ``f_h(x_h)`` together; ``loss_grad(x [h, P], heads [h])`` returns (f [h], g [h, P]) of those heads.

    A head stops when max |g_h| <= ``tol`` (scipy's ``gtol``, what scikit-learn's lbfgs uses) or after ``max_iter``
    iterations, or when no step decreases its loss any more (float precision). Steps are backtracking Armijo line
    searches from 1 (from ``1 / |g|`` on the first iteration of a head without ``history``). ``history``: curvature
    pairs to start from (a warm start from a neighbouring problem). ``precondition(q [H, P])``: an approximate inverse
    Hessian of every head applied to ``q`` (symmetric positive definite), the initial matrix of the two-loop recursion in
    place of the identity; the curvature pairs then correct it, and the first step of a head without history is 1.
    """
    H = x0.shape[0]
    heads = torch.arange(H, device=x0.device)
    x = x0.clone()
    f, g = loss_grad(x, heads)
    iterations = torch.zeros(H, dtype=torch.long, device=x.device)
    done = g.abs().amax(1) <= tol
    history = list(history or [])
    gamma = _gamma(history, H, x, precondition)
    for it in range(max_iter):
        active = ~done
        if not bool(active.any()):
            break
        d = _two_loop(g, history, gamma, precondition)
        slope = (g * d).sum(1)
        bad = slope >= 0  # not a descent direction (numerical trouble): fall back to the gradient
        d[bad] = -g[bad]
        slope = torch.where(bad, -(g * g).sum(1), slope)
        t = torch.ones(H, device=x.device, dtype=x.dtype)
        if it == 0 and not history and precondition is None:
            t = torch.clamp(1.0 / g.abs().sum(1).clamp_min(1e-12), max=1.0)
        x_new, f_new, g_new, stuck = _line_search(loss_grad, x, f, d, slope, t, active, heads, c1, max_backtracks)
        g_new = torch.where((active & ~stuck)[:, None], g_new, g)
        s, y = x_new - x, g_new - g
        sy = (s * y).sum(1)
        valid = active & ~stuck & (sy > 1e-10 * (y * y).sum(1).clamp_min(1e-30))
        history.append((s, y, torch.where(valid, 1.0 / sy.clamp_min(1e-30), torch.zeros_like(sy))))
        gamma = torch.where(valid, sy / _curvature_norm(y, precondition), gamma)
        del history[:-memory]
        x, f, g = x_new, f_new, g_new
        iterations += active.long()
        done |= (g.abs().amax(1) <= tol) | stuck
        if progress is not None:
            progress(it + 1, int((~done).sum()))
    return LBFGSResult(x=x, loss=f, iterations=iterations, converged=g.abs().amax(1) <= tol, history=history)


def _curvature_norm(y: torch.Tensor, precondition=None) -> torch.Tensor:
    """y^T M y per head (M: the preconditioner, the identity without one): the scale s^T y / y^T M y makes the initial
    inverse Hessian ``gamma * M`` agree with the newest pair along y."""
    My = y if precondition is None else precondition(y)
    return (y * My).sum(1).clamp_min(1e-30)


def _gamma(history: list, H: int, x: torch.Tensor, precondition=None) -> torch.Tensor:
    """Initial inverse-Hessian scale per head from the newest valid pair of ``history`` (1 without one)."""
    gamma = torch.ones(H, device=x.device, dtype=x.dtype)
    for s, y, r in history:
        gamma = torch.where(r > 0, (s * y).sum(1) / _curvature_norm(y, precondition), gamma)
    return gamma
