"""The forward (noising) process and the training objective.

Everything the trainer and the samplers must agree on lives here: the beta schedule, the signal-to-noise ratio, the
fp32 forward process, the regression target for each prediction type and the min-SNR-gamma loss weights.

Schedules are handed to every diffusers scheduler as *explicit* ``trained_betas`` so that a sampler can never
silently rebuild a different schedule from a name (diffusers' own ``"sigmoid"`` beta schedule, for instance, is a
sigmoid on the betas, not Chen 2023's sigmoid on alpha-bar that crispdiff means). The saved config's ``beta_schedule``
still says what the betas are: diffusers' name where one rebuilds them, else :func:`schedule_label` prefixed
``crispdiff:`` (see ``pipelines/pipeline_crispdiff.py``, ``schedule_name_fields``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from crispdiff.core.config import SHIFTABLE_SCHEDULES, NoiseConfig

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
MAX_BETA = 0.999  # as in Nichol & Dhariwal 2021: keeps the last steps from dividing by ~0


def _betas_from_alpha_bar(alpha_bar: Callable[[float], float], num_train_timesteps: int) -> torch.Tensor:
    """Discretise a continuous alpha-bar(t), t in [0, 1], into betas: beta_i = 1 - abar((i+1)/T) / abar(i/T)."""
    betas = []
    for i in range(num_train_timesteps):
        t1, t2 = i / num_train_timesteps, (i + 1) / num_train_timesteps
        betas.append(min(1.0 - alpha_bar(t2) / alpha_bar(t1), MAX_BETA))
    return torch.tensor(betas, dtype=torch.float64)


def cosine_alpha_bar(t: float, offset: float = 0.008) -> float:
    """Nichol & Dhariwal's cosine schedule; the small offset keeps beta_0 from being vanishingly small."""
    return math.cos((t + offset) / (1 + offset) * math.pi / 2) ** 2


def sigmoid_alpha_bar(t: float, start: float = -3.0, end: float = 3.0, tau: float = 1.0) -> float:
    """Chen 2023 ("On the importance of noise scheduling"): alpha-bar follows a rescaled, reversed sigmoid.

    A wider (start, end) range or a larger tau spends more of the trajectory at high noise, which Chen found helps
    at higher resolutions. Normalised so that alpha-bar(0) = 1 and alpha-bar(1) = 0 (clamped to stay positive).
    """
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    v_start, v_end = sig(start / tau), sig(end / tau)
    value = (v_end - sig((t * (end - start) + start) / tau)) / (v_end - v_start)
    return min(max(value, 1e-9), 1.0)


def shift_alpha_bar(alpha_bar: Callable[[float], float], snr_shift: float) -> Callable[[float], float]:
    """``alpha_bar`` with its log-SNR moved by ``snr_shift`` nats at every t: logit(abar') = logit(abar) + shift.

    Why: a schedule is tuned for one amount of information per noisy value. The same cosine schedule destroys a
    16x16 latent's structure earlier in t than a 64 px image's, so small inputs want a positive shift (cleaner) and
    large ones a negative one (noisier). abar(0) = 1 stays 1 (SNR infinite), and abar -> 0 stays 0.
    """
    if snr_shift == 0:
        return alpha_bar
    factor = math.exp(snr_shift)

    def shifted(t: float) -> float:
        value = alpha_bar(t)
        if value >= 1.0:
            return 1.0
        snr = factor * value / (1.0 - value)
        return snr / (1.0 + snr)

    return shifted


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha-bar) so the last step is pure noise (SNR = 0)."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


def make_betas(
    schedule: str,
    num_train_timesteps: int = 1000,
    *,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    sigmoid_start: float = -3.0,
    sigmoid_end: float = 3.0,
    sigmoid_tau: float = 1.0,
    snr_shift: float = 0.0,
) -> torch.Tensor:
    """Betas (float64, shape [T]) for a named schedule, *before* any zero-terminal-SNR rescaling.

    ``snr_shift`` (see :func:`shift_alpha_bar`) applies to the schedules defined by a continuous alpha-bar (cosine,
    sigmoid); the linear ones are defined by their betas and refuse it.
    """
    if snr_shift and schedule not in SHIFTABLE_SCHEDULES:
        raise ValueError(f"--snr_shift applies to the cosine and sigmoid schedules, not {schedule!r}")
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    if schedule == "cosine":
        return _betas_from_alpha_bar(shift_alpha_bar(cosine_alpha_bar, snr_shift), num_train_timesteps)
    if schedule == "sigmoid":
        sigmoid = lambda t: sigmoid_alpha_bar(t, sigmoid_start, sigmoid_end, sigmoid_tau)  # noqa: E731
        return _betas_from_alpha_bar(shift_alpha_bar(sigmoid, snr_shift), num_train_timesteps)
    raise ValueError(f"--beta_schedule must be one of linear, scaled_linear, cosine, sigmoid; got {schedule!r}")


def betas_from_config(config: NoiseConfig) -> torch.Tensor:
    """The schedule a config asks for, without zero-SNR rescaling (see `NoiseSchedule` for the rescaled one)."""
    return make_betas(
        config.beta_schedule,
        config.num_train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        sigmoid_start=config.sigmoid_start,
        sigmoid_end=config.sigmoid_end,
        sigmoid_tau=config.sigmoid_tau,
        snr_shift=config.snr_shift,
    )


def _number(value: float) -> str:
    return f"{float(value):g}"


def schedule_label(config: NoiseConfig) -> str:
    """The schedule in crispdiff's words with every parameter that shapes it, e.g. ``cosine(snr_shift=-1)``,
    ``sigmoid(start=-3, end=3, tau=1)`` or ``linear(beta_start=0.0001, beta_end=0.02)``.

    Why not the bare ``--beta_schedule``: a shifted cosine is not the cosine schedule, and a saved folder must not say
    it is (the pipeline's ``beta_schedule``; the scheduler config's where diffusers has no name for the betas).
    """
    name = config.beta_schedule
    if name in ("linear", "scaled_linear"):
        params = [f"beta_start={_number(config.beta_start)}", f"beta_end={_number(config.beta_end)}"]
    elif name == "sigmoid":
        params = [f"start={_number(config.sigmoid_start)}", f"end={_number(config.sigmoid_end)}"]
        params.append(f"tau={_number(config.sigmoid_tau)}")
    else:
        params = []
    if config.snr_shift:
        params.append(f"snr_shift={_number(config.snr_shift)}")
    return f"{name}({', '.join(params)})" if params else str(name)


def scheduler_base_config(config: NoiseConfig) -> dict[str, Any]:
    """The scheduler config shared by every sampler of a saved pipeline.

    The betas are passed *un-rescaled* together with ``rescale_betas_zero_snr``: the diffusers schedulers that
    support zero terminal SNR apply the same rescaling themselves and then clamp the final alpha-bar away from 0,
    which DPM-Solver needs (its log-SNR would be -inf otherwise). ``beta_schedule`` is the label a scheduler config
    states when diffusers has no name that rebuilds these betas (``make_scheduler`` prefers diffusers' name).
    """
    return {
        "num_train_timesteps": config.num_train_timesteps,
        "trained_betas": betas_from_config(config).tolist(),
        "prediction_type": config.prediction_type,
        "rescale_betas_zero_snr": bool(config.rescale_betas_zero_snr),
        "beta_schedule": f"crispdiff:{schedule_label(config)}",
    }


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), in the form that matches each regression target.

    The paper's weight on the x0-MSE is min(SNR, gamma). Rewriting the loss for the other targets divides by
    the factor that relates their error to the x0 error: SNR for epsilon, SNR + 1 for v. For epsilon the weight is
    computed as min(1, gamma / SNR) so that SNR = 0 (zero terminal SNR) gives 1 instead of 0 / 0.

    For v and x0 the paper's weight vanishes at SNR = 0, yet every sampler's first step is taken there (with zero
    terminal SNR, exactly there): the pure-noise step would never learn to predict the data's mean. The SNR in the
    x0 weight is therefore clamped to [1 / gamma, gamma], symmetric in log-SNR, so the noisiest steps keep the weight
    of SNR = 1 / gamma.
    """
    if prediction_type == "epsilon":
        return torch.clamp(gamma / snr, max=1.0)  # gamma / 0 = inf -> 1
    x0_weight = torch.clamp(snr, min=1.0 / gamma, max=gamma)
    if prediction_type == "v_prediction":
        return x0_weight / (snr + 1.0)
    if prediction_type == "sample":
        return x0_weight
    raise ValueError(f"--prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}")


def _per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a [B] tensor to broadcast against a [B, ...] tensor of `ndim` dims."""
    return values.reshape(-1, *([1] * (ndim - 1)))


class NoiseSchedule(nn.Module):
    """Precomputed alpha-bar buffers and the operations of the training objective, all in fp32.

    Adding noise in fp32 matters under mixed precision: at small t, sqrt(1 - alpha-bar) is ~1e-2 and the bf16
    rounding of x_t would swamp the signal the model must learn to remove. A module with (non-persistent) buffers,
    so ``.to(device)`` moves every table at once and a new table cannot be forgotten; ``.to(dtype)`` is refused
    because the tables must stay fp32 whatever the model's precision.
    """

    alphas_cumprod: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    snr: torch.Tensor

    def __init__(self, betas: torch.Tensor, prediction_type: str = "v_prediction", rescale_zero_snr: bool = False):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"--prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}")
        if rescale_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
            if prediction_type == "epsilon":
                raise ValueError(
                    "--rescale_betas_zero_snr makes the last timestep pure noise, where predicting the noise is "
                    "trivial and x0 cannot be recovered from it; use --prediction_type v_prediction or sample."
                )
        self.prediction_type = prediction_type
        self.betas = betas.to(torch.float64)  # the float64 source of the tables; stays on the CPU
        alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.num_train_timesteps = len(betas)
        tables = {
            "alphas_cumprod": alphas_cumprod,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            # not diffusers' compute_snr: it derives SNR from the fp32 alpha-bar at every call, which is off by up to
            # 5e-4 (relative) at the smallest t of the cosine schedule; this table is exact to fp32 (float64 source)
            "snr": alphas_cumprod / (1.0 - alphas_cumprod),
        }
        for name, table in tables.items():
            self.register_buffer(name, table.float(), persistent=False)

    @classmethod
    def from_config(cls, config: NoiseConfig) -> NoiseSchedule:
        return cls(betas_from_config(config), config.prediction_type, config.rescale_betas_zero_snr)

    def _apply(self, fn: Any, recurse: bool = True) -> NoiseSchedule:
        """Moves between devices only: the tables stay fp32 (``.half()`` / ``.to(torch.bfloat16)`` are refused)."""
        before = self.snr.dtype
        super()._apply(fn, recurse)
        if self.snr.dtype != before:
            raise TypeError("NoiseSchedule tables stay float32; move it with .to(device) only")
        return self

    def sample_timesteps(
        self,
        batch_size: int,
        generator: torch.Generator,
        device: torch.device | str,
        weighting_scheme: str = "none",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
    ) -> torch.Tensor:
        """Integer timesteps in [0, T), drawn from `generator` (on its device) so runs resume exactly: uniformly, or
        with ``weighting_scheme="logit_normal"`` as T * sigmoid(N(logit_mean, logit_std)) (Esser et al. 2024), which
        spends the steps on the middle of the schedule, where the image's layout is decided, rather than on the
        nearly clean and nearly pure-noise ends that uniform times visit as often."""
        if weighting_scheme == "none":
            t = torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator, device=generator.device)
        elif weighting_scheme == "logit_normal":
            normal = torch.randn(batch_size, generator=generator, device=generator.device)
            fraction = torch.sigmoid(logit_mean + logit_std * normal)
            t = (fraction * self.num_train_timesteps).long().clamp(max=self.num_train_timesteps - 1)
        else:
            raise ValueError(f"--weighting_scheme must be none or logit_normal; got {weighting_scheme!r}")
        return t.to(device)

    def _coefficients(self, t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = _per_sample(self.sqrt_alphas_cumprod.to(t.device)[t], ndim)
        s = _per_sample(self.sqrt_one_minus_alphas_cumprod.to(t.device)[t], ndim)
        return a, s

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, computed in fp32 whatever the inputs' dtype."""
        a, s = self._coefficients(t, x0.ndim)
        return a * x0.float() + s * noise.float()

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model regresses: eps, v = sqrt(abar) eps - sqrt(1 - abar) x0, or x0 itself."""
        if self.prediction_type == "epsilon":
            return noise.float()
        if self.prediction_type == "sample":
            return x0.float()
        a, s = self._coefficients(t, x0.ndim)
        return a * noise.float() - s * x0.float()

    def predict_x0_and_noise(
        self, x_t: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Invert the target: recover (x0, eps) from x_t and a model prediction (exact for the true target)."""
        a, s = self._coefficients(t, x_t.ndim)
        out, x_t = model_output.float(), x_t.float()
        if self.prediction_type == "epsilon":
            return (x_t - s * out) / a, out
        if self.prediction_type == "sample":
            return out, (x_t - a * out) / s
        return a * x_t - s * out, s * x_t + a * out

    def loss_weights(self, t: torch.Tensor, snr_gamma: float | None) -> torch.Tensor:
        """Per-sample loss weights: min-SNR-gamma when `snr_gamma` is set, else ones."""
        if not snr_gamma:
            return torch.ones_like(t, dtype=torch.float32)
        return min_snr_weight(self.snr.to(t.device)[t], snr_gamma, self.prediction_type)

    def loss(
        self,
        model_output: torch.Tensor,
        x0: torch.Tensor,
        noise: torch.Tensor,
        t: torch.Tensor,
        snr_gamma: float | None = None,
    ) -> torch.Tensor:
        """Weighted MSE: the per-sample mean squared error times its min-SNR weight, averaged over the batch."""
        target = self.target(x0, noise, t)
        per_sample = (model_output.float() - target).pow(2).flatten(1).mean(dim=1)
        return (per_sample * self.loss_weights(t, snr_gamma)).mean()


def sample_noise(
    shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str, noise_offset: float = 0.0
) -> torch.Tensor:
    """Standard normal noise from `generator`, with optional offset noise (a per-channel constant shift).

    Offset noise lets the model change an image's mean colour, which plain eps-noise barely perturbs at high t.
    """
    noise = torch.randn(shape, generator=generator, device=generator.device)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(
            (shape[0], shape[1], *([1] * (len(shape) - 2))), generator=generator, device=generator.device
        )
    return noise.to(device)
