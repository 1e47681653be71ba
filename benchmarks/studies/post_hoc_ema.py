"""Post-hoc EMA (EDM2: Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models").

An issue 34 study, not adopted (see RESULTS: no EMA length beat the default).

An EMA's length decides much of a diffusion model's quality, and the best length depends on the run: too short keeps
the noise of the last steps, too long keeps weights from early training. Instead of guessing it before training, keep
two *power-function* EMAs and save them now and then; any other EMA length can then be rebuilt after training as a
least-squares combination of those snapshots.

A power-function EMA with exponent gamma averages the weights seen up to step t with density proportional to
``tau ** gamma`` on ``[0, t]``; its update is ``ema = beta * ema + (1 - beta) * weights`` with
``beta = (1 - 1 / t) ** (gamma + 1)``. Its length is stated as ``sigma_rel``, the standard deviation of that density
relative to ``t``. A snapshot of exponent gamma_i at step t_i is a known profile; the target profile (gamma, t) is
matched in the L2 sense by solving a small linear system over the snapshots' profiles (continuous time).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

__all__ = ["PowerEMA", "combine_snapshots", "gamma_from_sigma_rel", "post_hoc_coefficients", "sigma_rel_from_gamma"]


def sigma_rel_from_gamma(gamma: float) -> float:
    """The relative standard deviation of the power-function profile ``tau ** gamma`` on ``[0, 1]``."""
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def gamma_from_sigma_rel(sigma_rel: float) -> float:
    """The exponent whose profile has relative standard deviation ``sigma_rel`` (the largest real root of
    ``(gamma + 1) / ((gamma + 2)^2 (gamma + 3)) = sigma_rel^2``, a cubic in gamma)."""
    if not 0 < sigma_rel < sigma_rel_from_gamma(0.0):
        raise ValueError(f"sigma_rel must be in (0, {sigma_rel_from_gamma(0.0):.3f}), got {sigma_rel}")
    inverse = 1.0 / sigma_rel**2
    roots = np.roots([1.0, 7.0, 16.0 - inverse, 12.0 - inverse])
    real = roots[np.abs(roots.imag) < 1e-9].real
    return float(real.max())


def _profile_inner(t_a: np.ndarray, g_a: np.ndarray, t_b: np.ndarray, g_b: np.ndarray) -> np.ndarray:
    """L2 inner products of normalised power profiles ``p(tau) = (g + 1) tau^g / t^(g + 1)`` on ``[0, t]``."""
    t_min = np.minimum(t_a, t_b)
    exponent = g_a + g_b + 1
    return (g_a + 1) * (g_b + 1) * t_min**exponent / (exponent * t_a ** (g_a + 1) * t_b ** (g_b + 1))


def post_hoc_coefficients(
    snapshot_steps: Sequence[float], snapshot_gammas: Sequence[float], target_step: float, target_gamma: float
) -> np.ndarray:
    """Weights ``x`` (one per snapshot) such that ``sum_i x_i snapshot_i`` best matches the target EMA's profile."""
    t = np.asarray(snapshot_steps, dtype=np.float64)
    g = np.asarray(snapshot_gammas, dtype=np.float64)
    if t.shape != g.shape or not len(t):
        raise ValueError("one gamma per snapshot step, and at least one snapshot")
    gram = _profile_inner(t[:, None], g[:, None], t[None, :], g[None, :])
    target = _profile_inner(t, g, np.float64(target_step), np.float64(target_gamma))
    return np.linalg.lstsq(gram, target, rcond=None)[0]


def combine_snapshots(
    snapshots: Sequence[dict[str, torch.Tensor]], coefficients: Iterable[float]
) -> dict[str, torch.Tensor]:
    """``sum_i c_i * snapshot_i`` over state dicts with the same keys (floating tensors; others from the last)."""
    coefficients = [float(c) for c in coefficients]
    combined: dict[str, torch.Tensor] = {}
    for key, last in snapshots[-1].items():
        if not last.is_floating_point():
            combined[key] = last.clone()
            continue
        total = torch.zeros_like(last, dtype=torch.float64)
        for coefficient, snapshot in zip(coefficients, snapshots):
            total += coefficient * snapshot[key].double()
        combined[key] = total.to(last.dtype)
    return combined


class PowerEMA:
    """Power-function EMAs of a set of parameters, one per exponent (``sigma_rels`` given as relative lengths)."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], sigma_rels: Sequence[float]):
        self.gammas = [gamma_from_sigma_rel(s) for s in sigma_rels]
        params = list(parameters)
        self.averages = [[p.detach().clone().float() for p in params] for _ in self.gammas]
        self.step_count = 0

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Fold in the parameters after one more optimizer step (step 1 copies them: beta is 0 there)."""
        self.step_count += 1
        params = [p.detach().float() for p in parameters]
        for gamma, average in zip(self.gammas, self.averages):
            beta = (1.0 - 1.0 / self.step_count) ** (gamma + 1)
            torch._foreach_lerp_(average, params, 1.0 - beta)

    def state_dict(self) -> dict[str, object]:
        return {"step_count": self.step_count, "gammas": list(self.gammas), "averages": self.averages}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.step_count = int(state["step_count"])  # type: ignore[arg-type]
        for mine, saved in zip(self.averages, state["averages"]):  # type: ignore[call-overload]
            for target, value in zip(mine, saved):
                target.copy_(value)
