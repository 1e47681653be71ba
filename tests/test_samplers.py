"""Every sampler is *correct*, not just runnable: with the exact denoiser of Gaussian data it recovers the data.

If x0 ~ N(mu, s^2) per value, then x_t = a x0 + sigma eps (a^2 = alpha-bar_t, sigma^2 = 1 - a^2) is Gaussian too and
the optimal predictions have a closed form:

    E[x0 | x_t] = mu + a s^2 / (a^2 s^2 + sigma^2) (x_t - a mu),   eps = (x_t - a x0) / sigma,   v = a eps - sigma x0.

Plugged into the saved pipeline as its "UNet", every sampler x schedule x prediction type must turn pure noise into
samples with mean mu and standard deviation s. A sampler that mixes up the prediction type, the schedule's
alpha-bars or its step sizes lands elsewhere (the last test shows the check catches such a mix-up).

At 50 steps the first-order samplers fall short of s by their discretisation error (measured: DDIM 5-9%, DDPM with
``fixed_small`` variance 10-16%, largest on the linear schedule; DPM-Solver++ / UniPC / PNDM within 4%); the error
shrinks with more steps (DDIM 1%, DDPM 2.5% at 500), which the convergence test checks, so it is not a bug.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput

from crispdiff.core.config import NoiseConfig
from crispdiff.diffusion.schedule import scheduler_base_config
from crispdiff.pipelines.pipeline_crispdiff import SAMPLERS
from crispdiff.publish.export import build_pipeline

MU, S = 0.2, 0.3  # well inside [-1, 1], so the pipeline's clipping and its [0, 1] output clamp barely matter
STEPS = 50  # divides T = 1000, as DDIM and PNDM require
SIZE, BATCH = 8, 128  # 128 x 3 x 8 x 8 = 24,576 sampled values per combination
#: Allowed relative error of the sampled standard deviation at 50 steps (the measured discretisation error + margin).
STD_TOLERANCE = {"dpmsolver++": 0.05, "unipc": 0.05, "pndm": 0.06, "ddim": 0.12, "ddpm": 0.2}


class GaussianDenoiser(ModelMixin, ConfigMixin):
    """The Bayes-optimal denoiser of N(mu, s^2) data under a given schedule, in the UNet2DModel calling convention."""

    @register_to_config
    def __init__(
        self,
        alphas_cumprod: list[float],
        prediction_type: str,
        mu: float = MU,
        s: float = S,
        sample_size: int = SIZE,
        in_channels: int = 3,
    ):
        super().__init__()
        self.register_buffer("abar", torch.tensor(alphas_cumprod, dtype=torch.float64), persistent=False)
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a dtype and device, like a real UNet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int) -> UNet2DOutput:
        t = torch.as_tensor(timestep).long().reshape(-1)[0]
        a = self.abar[t].sqrt()
        sigma = (1.0 - self.abar[t]).sqrt()
        mu, s = self.config.mu, self.config.s
        x_t = sample.double()
        x0 = mu + a * s**2 / (a**2 * s**2 + sigma**2) * (x_t - a * mu)
        eps = (x_t - a * x0) / sigma
        prediction = {"sample": x0, "epsilon": eps, "v_prediction": a * eps - sigma * x0}[self.config.prediction_type]
        return UNet2DOutput(sample=prediction.to(sample.dtype))


def _pipeline(sampler: str, schedule: str, prediction_type: str, model_prediction_type: str | None = None):
    base = scheduler_base_config(NoiseConfig(beta_schedule=schedule, prediction_type=prediction_type))
    alphas_cumprod = torch.cumprod(1.0 - torch.tensor(base["trained_betas"], dtype=torch.float64), 0).tolist()
    denoiser = GaussianDenoiser(alphas_cumprod, model_prediction_type or prediction_type)
    try:
        pipeline = build_pipeline(unet=denoiser, scheduler_base_config=base, beta_schedule=schedule, sampler=sampler)
    except ValueError as refused:  # combinations the pipeline refuses on purpose (e.g. PNDM with x0-prediction)
        pytest.skip(f"{sampler} + {prediction_type}: {refused}")
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _samples(pipeline, steps: int = STEPS) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    images01 = pipeline(batch_size=BATCH, num_inference_steps=steps, generator=generator, output_type="pt").images
    return images01.double() * 2.0 - 1.0  # back to model space


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("schedule", ["cosine", "linear", "sigmoid"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samplers_recover_gaussian_data_with_the_exact_denoiser(sampler, schedule, prediction_type):
    x = _samples(_pipeline(sampler, schedule, prediction_type))
    mean, std = x.mean().item(), x.std().item()
    assert abs(mean - MU) < 0.02, f"mean {mean:.4f}, expected {MU}"
    assert abs(std / S - 1.0) < STD_TOLERANCE[sampler], f"std {std:.4f}, expected {S}"


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_first_order_samplers_converge_to_the_data_with_more_steps(sampler):
    """Their 50-step shortfall is discretisation error: at 500 steps the standard deviation is within 4% of s."""
    pipeline = _pipeline(sampler, "linear", "v_prediction")
    coarse, fine = _samples(pipeline, 50).std().item(), _samples(pipeline, 500).std().item()
    assert abs(fine / S - 1.0) < 0.04 and abs(fine / S - 1.0) < abs(coarse / S - 1.0), (coarse, fine)


def test_the_check_catches_a_prediction_type_mix_up():
    """A model that predicts v for a pipeline that expects epsilon must fail the same check."""
    x = _samples(_pipeline("dpmsolver++", "cosine", "epsilon", model_prediction_type="v_prediction"))
    assert abs(x.mean().item() - MU) > 0.02 or abs(x.std().item() / S - 1.0) > 0.05
