"""Schedules, SNR, targets and min-SNR weights against their closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from crispdiff.core.config import NoiseConfig, TrainConfig
from crispdiff.core.errors import FlagError
from crispdiff.core.flags import parse_config
from crispdiff.diffusion.schedule import (
    NoiseSchedule,
    cosine_alpha_bar,
    make_betas,
    min_snr_weight,
    rescale_zero_terminal_snr,
    sample_noise,
    scheduler_base_config,
    sigmoid_alpha_bar,
)

T = 1000


def test_linear_and_scaled_linear_endpoints():
    betas = make_betas("linear", T, beta_start=1e-4, beta_end=0.02)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    scaled = make_betas("scaled_linear", T, beta_start=0.00085, beta_end=0.012)
    assert scaled[0].item() == pytest.approx(0.00085) and scaled[-1].item() == pytest.approx(0.012)
    assert torch.all(scaled.sqrt().diff() > 0)  # linear in sqrt(beta)


@pytest.mark.parametrize(
    "schedule, alpha_bar",
    [("cosine", cosine_alpha_bar), ("sigmoid", lambda t: sigmoid_alpha_bar(t, -3.0, 3.0, 1.0))],
)
def test_alpha_bar_matches_continuous_form(schedule, alpha_bar):
    s = NoiseSchedule(make_betas(schedule, T))
    expected = torch.tensor([alpha_bar((i + 1) / T) / alpha_bar(0.0) for i in range(T)], dtype=torch.float64)
    # the 0.999 cap on beta only bites in the last few steps
    unclipped = make_betas(schedule, T) < 0.999
    torch.testing.assert_close(s.alphas_cumprod[unclipped].double(), expected[unclipped], rtol=1e-5, atol=1e-7)
    assert torch.all(s.alphas_cumprod.diff() <= 0)
    ab = s.alphas_cumprod.double()
    torch.testing.assert_close(s.snr.double(), ab / (1 - ab), rtol=1e-3, atol=0)


def test_sigmoid_schedule_is_chens_not_diffusers():
    """diffusers' beta_schedule="sigmoid" is a sigmoid on the betas; ours puts it on alpha-bar (Chen 2023)."""
    ours = NoiseSchedule(make_betas("sigmoid", T)).alphas_cumprod
    theirs = DDPMScheduler(num_train_timesteps=T, beta_schedule="sigmoid").alphas_cumprod
    assert (ours - theirs).abs().max() > 0.05
    # Chen's schedule crosses alpha-bar = 1/2 at the middle of the trajectory for a symmetric range
    assert ours[T // 2 - 1].item() == pytest.approx(0.5, abs=1e-2)
    tau2 = NoiseSchedule(make_betas("sigmoid", T, sigmoid_tau=2.0)).alphas_cumprod
    assert not torch.allclose(ours, tau2)


@pytest.mark.parametrize("schedule", ["cosine", "sigmoid"])
def test_snr_shift_moves_log_snr_by_the_shift(schedule):
    """--snr_shift s multiplies every step's SNR by e^s (away from the capped last steps), and the saved
    scheduler config carries the shifted betas, so training and sampling agree."""
    plain = NoiseSchedule(make_betas(schedule, T)).snr.double()
    shifted = NoiseSchedule(make_betas(schedule, T, snr_shift=1.5)).snr.double()
    middle = slice(10, T - 20)
    torch.testing.assert_close(
        shifted[middle].log() - plain[middle].log(), torch.full_like(plain[middle], 1.5), rtol=0, atol=2e-3
    )
    config = NoiseConfig(beta_schedule=schedule, snr_shift=-1.0)
    saved = DDPMScheduler(**scheduler_base_config(config)).alphas_cumprod.double()
    torch.testing.assert_close(saved, NoiseSchedule.from_config(config).alphas_cumprod.double(), rtol=1e-5, atol=1e-7)
    assert saved[T // 2] < NoiseSchedule(make_betas(schedule, T)).alphas_cumprod[T // 2]
    with pytest.raises(ValueError, match="snr_shift"):
        make_betas("linear", T, snr_shift=1.0)
    # on the command line it is a one-line flag error before any model is built
    with pytest.raises(FlagError, match="--snr_shift applies to the cosine and sigmoid schedules, not 'linear'"):
        parse_config(TrainConfig, ["--beta_schedule", "linear", "--snr_shift", "1"])


def test_zero_terminal_snr_rescale():
    betas = make_betas("cosine", T)
    rescaled = rescale_zero_terminal_snr(betas)
    ab = torch.cumprod(1 - rescaled, 0)
    assert ab[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert ab[0].item() == pytest.approx(torch.cumprod(1 - betas, 0)[0].item(), rel=1e-9)
    s = NoiseSchedule(betas, "v_prediction", rescale_zero_snr=True)
    assert s.snr[-1].item() == 0.0
    # the schedulers given the base config rescale identically
    config = NoiseConfig(rescale_betas_zero_snr=True)
    sched = DDPMScheduler(**scheduler_base_config(config))
    torch.testing.assert_close(sched.alphas_cumprod[:-1], s.alphas_cumprod[:-1], rtol=1e-4, atol=1e-6)


def test_epsilon_with_zero_snr_is_rejected():
    with pytest.raises(ValueError, match="v_prediction"):
        NoiseSchedule(make_betas("cosine", T), "epsilon", rescale_zero_snr=True)


def test_min_snr_weights_per_target():
    snr = torch.tensor([0.0, 0.5, 5.0, 50.0])
    gamma = 5.0
    # the SNR in the x0 weight is clamped to [1/gamma, gamma]: SNR 0 weighs like SNR 0.2
    torch.testing.assert_close(min_snr_weight(snr, gamma, "sample"), torch.tensor([0.2, 0.5, 5.0, 5.0]))
    torch.testing.assert_close(
        min_snr_weight(snr, gamma, "v_prediction"), torch.tensor([0.2, 0.5 / 1.5, 5.0 / 6.0, 5.0 / 51.0])
    )
    eps = min_snr_weight(snr, gamma, "epsilon")
    torch.testing.assert_close(eps, torch.tensor([1.0, 1.0, 1.0, 0.1]))
    assert torch.isfinite(eps).all()
    with pytest.raises(ValueError):
        min_snr_weight(snr, gamma, "flow")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_targets_invert_exactly(prediction_type):
    s = NoiseSchedule(make_betas("cosine", T), prediction_type)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(6, 3, 8, 8, generator=g)
    t = torch.tensor([1, 10, 200, 500, 800, 990])
    x_t = s.add_noise(x0, noise, t)
    x0_hat, noise_hat = s.predict_x0_and_noise(x_t, s.target(x0, noise, t), t)
    torch.testing.assert_close(x0_hat, x0, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(noise_hat, noise, atol=2e-3, rtol=1e-3)


def test_v_target_closed_form():
    s = NoiseSchedule(make_betas("linear", T), "v_prediction")
    x0, noise, t = torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 2.0), torch.tensor([300])
    ab = s.alphas_cumprod[300].item()
    assert s.target(x0, noise, t).item() == pytest.approx(math.sqrt(ab) * 2.0 - math.sqrt(1 - ab) * 1.0, rel=1e-5)


def test_noise_is_added_in_fp32():
    s = NoiseSchedule(make_betas("cosine", T))
    x0 = torch.rand(2, 3, 4, 4).to(torch.bfloat16)
    noise = torch.randn(2, 3, 4, 4).to(torch.bfloat16)
    assert s.add_noise(x0, noise, torch.tensor([0, 999])).dtype == torch.float32


def test_pure_noise_step_still_learns_with_min_snr():
    """With zero terminal SNR the last step is where sampling starts; its min-SNR weight must not be 0."""
    for prediction_type in ("v_prediction", "sample"):
        s = NoiseSchedule(make_betas("cosine", T), prediction_type, rescale_zero_snr=True)
        last = torch.tensor([T - 1])
        assert s.snr[-1].item() == 0.0
        assert s.loss_weights(last, 5.0).item() == pytest.approx(0.2)


def test_logit_normal_timesteps_favour_the_middle_and_are_reproducible():
    """--weighting_scheme logit_normal draws t / T from sigmoid(N(mean, std)): in range, centred where the mean
    says, more often mid-run than uniform times, and the same for the same generator seed."""
    s = NoiseSchedule(make_betas("cosine", T))

    def draw(scheme: str, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
        return s.sample_timesteps(20_000, torch.Generator().manual_seed(0), "cpu", scheme, mean, std)

    uniform, logit = draw("none"), draw("logit_normal")
    assert logit.dtype == torch.long and logit.min() >= 0 and logit.max() <= T - 1
    middle = lambda t: ((t >= 250) & (t < 750)).float().mean().item()  # noqa: E731
    assert middle(uniform) == pytest.approx(0.5, abs=0.02)
    assert middle(logit) == pytest.approx(0.728, abs=0.015)  # P(|N(0, 1)| < logit(0.75) = 1.0986)
    assert logit.float().median().item() == pytest.approx(T / 2, abs=15)
    shifted_median = draw("logit_normal", mean=1.0).float().median().item()
    assert shifted_median == pytest.approx(T / (1 + math.exp(-1.0)), abs=15)
    assert middle(draw("logit_normal", std=3.0)) < middle(logit)
    assert torch.equal(logit, draw("logit_normal"))
    with pytest.raises(ValueError, match="weighting_scheme"):
        draw("mode")


def test_logit_normal_flags_need_the_scheme():
    with pytest.raises(FlagError, match="--logit_std"):
        parse_config(TrainConfig, ["--logit_std", "2"])
    config = parse_config(TrainConfig, ["--weighting_scheme", "logit_normal", "--logit_std", "2"])
    assert (config.weighting_scheme, config.logit_std) == ("logit_normal", 2.0)


def test_loss_weighting_and_offset_noise():
    s = NoiseSchedule(make_betas("cosine", T), "v_prediction")
    t = torch.tensor([5, 900])
    assert torch.equal(s.loss_weights(t, None), torch.ones(2))
    snr = s.snr[t]
    expected = snr.clamp(1 / 3.0, 3.0) / (snr + 1)  # gamma 3: the high-SNR step is capped, the noisy one floored
    torch.testing.assert_close(s.loss_weights(t, 3.0), expected)
    assert s.loss_weights(t, 3.0)[0] < s.loss_weights(t, 30.0)[0]  # gamma matters where SNR is large
    a = sample_noise((4, 3, 8, 8), torch.Generator().manual_seed(1), "cpu")
    b = sample_noise((4, 3, 8, 8), torch.Generator().manual_seed(1), "cpu", noise_offset=0.5)
    assert not torch.equal(a, b)
    # the offset is constant over each channel's pixels
    diff = b - a
    torch.testing.assert_close(diff, diff[:, :, :1, :1].expand_as(diff))


def test_base_config_agrees_with_every_scheduler():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler, UniPCMultistepScheduler

    config = NoiseConfig()
    ours = NoiseSchedule.from_config(config).alphas_cumprod
    base = scheduler_base_config(config)
    assert base["prediction_type"] == "v_prediction" and len(base["trained_betas"]) == T
    for cls in (DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler, PNDMScheduler):
        kwargs = {k: v for k, v in base.items() if k != "rescale_betas_zero_snr" or cls is not PNDMScheduler}
        torch.testing.assert_close(cls(**kwargs).alphas_cumprod, ours, rtol=1e-5, atol=1e-7)


def test_noise_schedule_is_a_module_whose_tables_move_together_and_stay_fp32():
    s = NoiseSchedule(make_betas("cosine", T))
    names = {name for name, _ in s.named_buffers()}
    assert names == {"alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "snr"}
    assert s.state_dict() == {}, "derived from the config: nothing to save in checkpoints"
    assert s.to("meta").snr.device.type == "meta" and s.sqrt_alphas_cumprod.device.type == "meta"
    with pytest.raises(TypeError, match="float32"):
        NoiseSchedule(make_betas("cosine", T)).to(torch.bfloat16)
