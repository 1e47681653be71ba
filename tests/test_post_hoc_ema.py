"""Post-hoc EMA: an EMA length chosen after training is rebuilt from two power-function EMAs' snapshots."""

from __future__ import annotations

import pytest
import torch

from crispdiff.train.post_hoc_ema import (
    PowerEMA,
    combine_snapshots,
    gamma_from_sigma_rel,
    post_hoc_coefficients,
    sigma_rel_from_gamma,
)


def test_sigma_rel_and_gamma_are_inverse():
    for sigma_rel in (0.01, 0.05, 0.1, 0.2):
        assert sigma_rel_from_gamma(gamma_from_sigma_rel(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-9)
    with pytest.raises(ValueError, match="sigma_rel"):
        gamma_from_sigma_rel(0.5)


@pytest.mark.parametrize("target_sigma_rel", [0.07, 0.15])
def test_a_known_ema_is_rebuilt_from_snapshots_of_two_others(target_sigma_rel):
    """A toy parameter wanders for 1,000 steps while EMAs of sigma_rel 0.05 and 0.10 are snapshotted every 50 steps;
    the reconstruction of a third EMA, tracked directly alongside, must land far closer to it than the stored EMAs
    or the raw weights are."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.zeros(64))
    stored = PowerEMA([weight], [0.05, 0.10])
    target = PowerEMA([weight], [target_sigma_rel])
    snapshots, steps, gammas = [], [], []
    drift = torch.randn(64, generator=generator) * 0.01
    for step in range(1, 1001):
        weight.data += torch.randn(64, generator=generator) * 0.1 + drift
        stored.step([weight])
        target.step([weight])
        if step % 50 == 0:
            for gamma, average in zip(stored.gammas, stored.averages):
                snapshots.append({"weight": average[0].clone(), "count": torch.tensor(step)})
                steps.append(step)
                gammas.append(gamma)
    coefficients = post_hoc_coefficients(steps, gammas, 1000, target.gammas[0])
    rebuilt = combine_snapshots(snapshots, coefficients)
    truth = target.averages[0][0]
    error = (rebuilt["weight"] - truth).norm()
    nearest_stored = min((average[0] - truth).norm() for average in stored.averages)
    assert error < 0.01 * nearest_stored and error < 0.01 * (weight.detach() - truth).norm()
    assert coefficients.sum() == pytest.approx(1.0, abs=1e-3)  # an average of averages
    assert rebuilt["count"].item() == 1000  # non-float entries come from the last snapshot


def test_the_first_step_copies_the_weights_and_state_round_trips():
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = PowerEMA([weight], [0.1])
    weight.data += 5
    ema.step([weight])
    assert torch.equal(ema.averages[0][0], weight.detach())
    other = PowerEMA([weight], [0.1])
    other.load_state_dict(ema.state_dict())
    assert other.step_count == 1 and torch.equal(other.averages[0][0], ema.averages[0][0])
