"""crispdiff.evaluate.metrics: identities, determinism and the direction each metric moves under blur, noise and colour
blobs.

Direction tests run on real Noto emoji from ../shared (skipped when absent); identities run on synthetic images.
SWD uses fewer random directions where only a direction is checked, to keep the file fast on one core.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from crispdiff.evaluate.colour_blob import (
    colour_blob_score,
    colour_histogram,
    jensen_shannon_divergence,
    one_sided_deficit,
)
from crispdiff.evaluate.distribution import _pyr_up, laplacian_pyramid, sliced_wasserstein_distance
from crispdiff.evaluate.inception import INCEPTION_WEIGHTS_FILENAME, find_inception_weights, inception_metrics
from crispdiff.evaluate.inputs import to_float01
from crispdiff.evaluate.memorisation import NEAR_COPY_FACTOR, nearest_neighbours
from crispdiff.evaluate.metrics import compute_all, compute_validation_metrics, real_vs_real_floor, split_reference
from crispdiff.evaluate.sharpness import high_frequency_share, laplacian_variance, sharpness_ratios

FAST_SWD = {"num_directions": 32, "num_repeats": 1}


# ---- data and perturbations -----------------------------------------------------------------------------------------


def load_emoji(folder: Path, count: int) -> torch.Tensor:
    """``count`` emoji spread over the whole set (every k-th file), composited onto white, uint8 [N, 3, 64, 64]."""
    names = [json.loads(line)["file_name"] for line in (folder / "metadata.jsonl").read_text().splitlines() if line]
    step = max(1, len(names) // count)
    images = []
    for name in names[::step][:count]:
        rgba = PIL.Image.open(folder / name).convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        images.append(np.asarray(PIL.Image.alpha_composite(white, rgba).convert("RGB")))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def emoji(emoji_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint sets of 150 real emoji as float [0, 1]: A (the reference) and B (stands in for a generator)."""
    images = to_float01(load_emoji(emoji_dir, 300))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    return images[order[:150]], images[order[150:300]]


def gaussian_blur(images01: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = int(3 * sigma + 0.5)
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1) / sigma) ** 2)
    taps = taps / taps.sum()
    kernel = torch.outer(taps, taps).expand(3, 1, -1, -1)
    return F.conv2d(F.pad(images01, (radius,) * 4, mode="reflect"), kernel, groups=3)


def add_noise(images01: torch.Tensor, std: float, seed: int = 1) -> torch.Tensor:
    noise = torch.randn(images01.shape, generator=torch.Generator().manual_seed(seed))
    return (images01 + std * noise).clamp(0, 1)


def blobify(images01: torch.Tensor, colour_shift: bool = True) -> torch.Tensor:
    """Large flat patches: average down to 8 px and back up; optionally rotate half of each colour into another."""
    size = images01.shape[-1]
    blobs = F.interpolate(F.interpolate(images01, size=8, mode="area"), size=size, mode="bilinear")
    return 0.5 * blobs + 0.5 * blobs[:, [2, 0, 1]] if colour_shift else blobs


def smooth_random_images(count: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Synthetic images with structure at several scales, for identities that need no real data."""
    gen = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(count, 3, 4, 4, generator=gen), size=size, mode="bicubic")
    fine = torch.rand(count, 3, size, size, generator=gen)
    return (0.7 * coarse + 0.3 * fine).clamp(0, 1)


# ---- input handling and the pyramid ---------------------------------------------------------------------------------


def test_to_float01_accepts_common_layouts_and_rejects_mistakes():
    x = smooth_random_images(3, 16)
    as_uint8 = (x * 255).round().to(torch.uint8)
    nhwc = as_uint8.permute(0, 2, 3, 1).numpy()
    assert torch.equal(to_float01(nhwc), to_float01(as_uint8))
    assert torch.allclose(to_float01(as_uint8), x, atol=1 / 255)
    assert to_float01(x[:, :1]).shape == (3, 3, 16, 16)
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        to_float01(x * 2 - 1)
    with pytest.raises(ValueError, match="RGBA"):
        to_float01(torch.rand(2, 4, 16, 16))
    with pytest.raises(ValueError, match="4 dimensions"):
        to_float01(torch.rand(3, 16, 16))


def test_laplacian_pyramid_levels_and_exact_reconstruction():
    x = smooth_random_images(2, 64)
    levels = laplacian_pyramid(x, min_resolution=16)
    assert [level.shape[-1] for level in levels] == [64, 32, 16]
    rebuilt = levels[-1]
    for detail in reversed(levels[:-1]):
        rebuilt = detail + _pyr_up(rebuilt, detail.shape[-2:])
    assert torch.allclose(rebuilt, x, atol=1e-5)
    flat = laplacian_pyramid(torch.full((1, 3, 64, 64), 0.3))
    assert all(level.abs().max() < 1e-6 for level in flat[:-1])
    assert [lv.shape[-1] for lv in laplacian_pyramid(torch.rand(1, 3, 96, 96))] == [96, 48, 24]


# ---- SWD ------------------------------------------------------------------------------------------------------------


def test_swd_identity_symmetry_and_determinism():
    a, b = smooth_random_images(24, seed=0), smooth_random_images(24, seed=1)
    same = sliced_wasserstein_distance(a, a, **FAST_SWD)
    assert set(same) == {"swd_32", "swd_16", "swd_avg"}
    assert all(value == 0.0 for value in same.values())
    ab = sliced_wasserstein_distance(a, b, seed=3)
    assert ab == sliced_wasserstein_distance(b, a, seed=3)  # symmetric, bit for bit
    assert ab == sliced_wasserstein_distance(a, b, seed=3)  # deterministic
    assert ab["swd_avg"] > 0
    assert ab != sliced_wasserstein_distance(a, b, seed=4)
    uneven = sliced_wasserstein_distance(a, b[:10], **FAST_SWD)  # different counts are subsampled, not an error
    assert uneven["swd_avg"] > 0
    with pytest.raises(ValueError, match="equal resolutions"):
        sliced_wasserstein_distance(a, smooth_random_images(4, 16))


def test_swd_grows_with_blur_and_with_noise(emoji):
    a, b = emoji

    def swd(x: torch.Tensor) -> float:
        return sliced_wasserstein_distance(a, x, **FAST_SWD)["swd_avg"]

    floor = swd(b)
    blur1, blur2 = swd(gaussian_blur(b, 1.0)), swd(gaussian_blur(b, 2.0))
    noise1, noise2 = swd(add_noise(b, 0.05)), swd(add_noise(b, 0.1))
    assert floor * 1.5 < blur1 < blur2
    assert floor * 1.5 < noise1 < noise2


# ---- sharpness ------------------------------------------------------------------------------------------------------


def test_high_frequency_share_extremes():
    checkerboard = ((torch.arange(16)[:, None] + torch.arange(16)[None]) % 2).float().expand(1, 3, 16, 16)
    assert high_frequency_share(checkerboard).item() == pytest.approx(1.0)
    assert high_frequency_share(torch.full((1, 3, 16, 16), 0.5)).item() == 0.0
    ramp = torch.linspace(0, 1, 16).expand(1, 3, 16, 16)
    assert high_frequency_share(ramp).item() < 0.1
    assert laplacian_variance(ramp).item() == pytest.approx(0.0, abs=1e-10)


def test_sharpness_ratios_blurred_below_one_noised_above(emoji):
    a, b = emoji
    floor = sharpness_ratios(a, b)
    blurred = sharpness_ratios(a, gaussian_blur(b, 1.0))
    noised = sharpness_ratios(a, add_noise(b, 0.05))
    for key in ("hf_energy_ratio", "laplacian_var_ratio"):
        assert 0.8 < floor[key] < 1.25, (key, floor[key])
        assert blurred[key] < 0.5, (key, blurred[key])
        assert noised[key] > 1.3, (key, noised[key])
    assert blurred["hf_energy_real"] == floor["hf_energy_real"]


# ---- colour blobs ---------------------------------------------------------------------------------------------------


def test_colour_blob_indicator_moves_the_right_way(emoji):
    a, b = emoji
    floor = colour_blob_score(a, b)
    blurred = colour_blob_score(a, gaussian_blur(b, 1.0))
    noised = colour_blob_score(a, add_noise(b, 0.1))
    flat_blobs = colour_blob_score(a, blobify(b, colour_shift=False))
    blobs = colour_blob_score(a, blobify(b))
    shifted = colour_blob_score(a, 0.5 * b + 0.5 * b[:, [2, 0, 1]])
    # the full failure (flat and wrongly coloured) scores highest, then flatness alone, then mild blur
    assert blobs["colour_blob"] > flat_blobs["colour_blob"] > blurred["colour_blob"] > 2 * floor["colour_blob"]
    # noise is a different failure: it must not read as blobs
    assert noised["colour_blob"] < floor["colour_blob"] + 0.03
    # each half measures its own thing
    assert shifted["colour_hist_jsd"] > 5 * floor["colour_hist_jsd"]
    assert shifted["edge_density_deficit"] < 0.05
    assert flat_blobs["edge_density_deficit"] > 0.9
    assert blurred["colour_hist_jsd"] < 2 * floor["colour_hist_jsd"] + 0.01


def test_one_sided_deficit_ignores_excess_and_sees_mixtures():
    real = torch.full((100,), 0.2)
    assert one_sided_deficit(real, torch.full((50,), 0.4)) == 0.0
    assert one_sided_deficit(real, torch.zeros(50)) == pytest.approx(1.0)
    half_flat_half_noisy = torch.cat([torch.zeros(50), torch.full((50,), 0.4)])  # same mean as real
    assert one_sided_deficit(real, half_flat_half_noisy) == pytest.approx(0.5, abs=0.01)
    p = colour_histogram(smooth_random_images(4))
    assert p.sum().item() == pytest.approx(1.0)
    assert jensen_shannon_divergence(p, p) == 0.0


# ---- memorisation ---------------------------------------------------------------------------------------------------


def test_memorisation_check_finds_planted_copies():
    train = smooth_random_images(200, seed=0)
    fresh = smooth_random_images(20, seed=1)
    planted = [3, 50, 77, 120, 199]
    copies = train[planted]
    near_copies = add_noise(train[[10, 11]], 0.005, seed=2)
    samples = torch.cat([fresh, copies, near_copies])
    result = nearest_neighbours(samples, train)
    assert result["distances"].shape == (27,) and result["indices"].shape == (27,)
    assert result["indices"][20:25].tolist() == planted
    assert result["indices"][25:].tolist() == [10, 11]
    assert torch.all(result["distances"][20:25] < 1e-3)
    assert result["near_copy_fraction"] == pytest.approx(7 / 27)
    assert result["threshold"] == pytest.approx(NEAR_COPY_FACTOR * result["real_nn_distance_median"])
    assert torch.all(result["distances"][:20] > result["threshold"])
    upscaled = nearest_neighbours(F.interpolate(copies, scale_factor=2, mode="nearest"), train)
    assert upscaled["indices"].tolist() == planted  # samples are brought to the training resolution first


def test_copy_check_warns_on_copies_not_on_new_images():
    from crispdiff.evaluate.memorisation import COPYING_RATIO, copy_check

    train = smooth_random_images(200, seed=0)
    new, new_warning = copy_check(smooth_random_images(40, seed=1), train)
    assert new["nn_median_ratio"] > 2 * COPYING_RATIO and new["near_copy_fraction"] == 0.0 and new_warning is None
    copied, warning = copy_check(add_noise(train[:40], 0.005, seed=2), train)
    assert copied["nn_median_ratio"] < 0.1 and copied["near_copy_fraction"] == 1.0
    assert warning is not None and "200 training images" in warning and "--max_train_steps" in warning
    assert "--augment_prob" in warning  # the lever that keeps a long run's samples new (RESULTS.md)
    half, _ = copy_check(torch.cat([train[:10], smooth_random_images(30, seed=3)]), train)
    assert half["near_copy_fraction"] == pytest.approx(0.25)  # the share counts the copies among new images


# ---- FID / KID ------------------------------------------------------------------------------------------------------


def test_fid_without_weights_is_a_message_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    x = smooth_random_images(4)
    status = inception_metrics(x, x)["fid_status"]
    assert "--inception_weights" in status and INCEPTION_WEIGHTS_FILENAME in status
    assert str(tmp_path / "torch_home") in status  # says where the cache file would go
    missing = tmp_path / "nope.pth"
    assert str(missing) in inception_metrics(x, x, weights=missing)["fid_status"]
    assert find_inception_weights(None) is None
    result = compute_all(x, x, fid=True, swd_kwargs=FAST_SWD)
    assert "fid" not in result and "fid_status" in result and result["swd_avg"] == 0.0


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory) -> Path:
    """A state dict for torch-fidelity's InceptionV3 with random (Kaiming) weights: exercises the FID/KID plumbing
    offline. The real weights cannot be downloaded here, and the metric code must never try."""
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fidelity, "load_state_dict_from_url", lambda *a, **k: {})
        patch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        torch.manual_seed(0)
        net = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path


def test_fid_and_kid_from_a_local_weights_file(random_inception_weights, monkeypatch):
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")

    def no_download(*args, **kwargs):
        raise AssertionError("the metrics tried to download Inception weights")

    monkeypatch.setattr(fidelity, "load_state_dict_from_url", no_download)
    a, b = smooth_random_images(3, seed=0), smooth_random_images(3, seed=5)
    same = inception_metrics(a, a, weights=random_inception_weights, kid_subsets=10)
    different = inception_metrics(a, blobify(b), weights=random_inception_weights, kid_subsets=10)
    assert different["fid"] > 1e-2 and different["kid_mean"] > 1e-4
    assert abs(same["fid"]) < 1e-3 * different["fid"]
    assert same["kid_mean"] < 0.1 * different["kid_mean"]  # the unbiased MMD estimate of a set with itself is <= 0
    assert str(random_inception_weights) in different["fid_status"]


def test_fid_refuses_a_file_that_is_not_a_state_dict(tmp_path):
    pytest.importorskip("torch_fidelity")
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a plain PyTorch state dict"):
        inception_metrics(smooth_random_images(2), smooth_random_images(2), weights=bad)


# ---- aggregates -----------------------------------------------------------------------------------------------------


def test_real_vs_real_floor_and_compute_all(emoji):
    a, b = emoji
    reference = torch.cat([a, b])
    floor = real_vs_real_floor(reference, num_images=100, swd_kwargs=FAST_SWD)
    assert floor["num_real"] == floor["num_fake"] == 100
    blurred = compute_all(a[:100], gaussian_blur(b[:100], 1.5), train=reference, swd_kwargs=FAST_SWD)
    assert set(floor) == set(blurred)
    assert blurred["swd_avg"] > 1.5 * floor["swd_avg"]
    assert floor["near_copy_fraction"] < 0.1  # B is not in the training set it is compared with
    assert blurred["hf_energy_ratio"] < 0.5 < floor["hf_energy_ratio"]
    json.dumps(floor)  # JSON-ready
    idx_a, idx_b = split_reference(300, 100, seed=0)
    assert len(idx_a) == len(idx_b) == 100 and not set(idx_a.tolist()) & set(idx_b.tolist())


def test_validation_metrics_are_cheap_flat_and_deterministic():
    real = (smooth_random_images(16, 32, seed=0) * 255).round().to(torch.uint8)
    fake = smooth_random_images(16, 64, seed=1)  # larger: resized to the real resolution
    first = compute_validation_metrics(real, fake, seed=0)
    assert first == compute_validation_metrics(real, fake, seed=0)
    assert {"swd_avg", "swd_32", "swd_16", "hf_energy_ratio", "laplacian_var_ratio", "colour_blob"} <= set(first)
    assert all(isinstance(v, float) and np.isfinite(v) for v in first.values())


def test_feature_precision_recall_tell_fidelity_from_coverage():
    """Same distribution: all four near their real-vs-real values; far away: zero; a collapse onto a fifth of the
    real vectors: precise but not covering; spread too wide: covering the data but imprecise."""
    from crispdiff.evaluate.feature_metrics import feature_precision_recall, kth_neighbour_radii

    generator = torch.Generator().manual_seed(0)
    real = torch.randn(600, 8, generator=generator)
    same = feature_precision_recall(real, torch.randn(600, 8, generator=generator))
    assert same["precision"] > 0.8 and same["recall"] > 0.8 and same["coverage"] > 0.8
    assert 0.8 < same["density"] < 1.2
    far = feature_precision_recall(real, torch.randn(600, 8, generator=generator) + 20)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    collapsed = real[:120].repeat(5, 1) + 0.01 * torch.randn(600, 8, generator=generator)
    mode = feature_precision_recall(real, collapsed)
    assert mode["precision"] > 0.95 and mode["recall"] < 0.3 and mode["coverage"] < same["coverage"] - 0.2
    wide = feature_precision_recall(real, 3 * torch.randn(600, 8, generator=generator))
    assert wide["precision"] < 0.5 and wide["recall"] > same["recall"] - 0.1 and wide["density"] < 0.3
    # the radius of each ball is the distance to the k-th other vector, never to itself
    line = torch.tensor([[0.0], [1.0], [3.0], [6.0]])
    assert kth_neighbour_radii(line, 1).tolist() == [1.0, 1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="k=3"):
        kth_neighbour_radii(line[:3], 3)
