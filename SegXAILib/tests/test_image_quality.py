"""Acquisition-quality scores against constructed scans with known noise, smoothness and contrast, and
the cohort outliers they call: degraded copies of real lesion cases stand out, clean ones do not."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from SegXAILib.image_quality import IMAGE_SCORES, MIN_COHORT, cohort_outliers, image_quality


def ball(shape=(48, 56, 64), radius=0.8) -> np.ndarray:
    axes = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    return sum(a**2 for a in axes) < radius**2


def test_noise_is_the_white_noise_std_over_the_median():
    rng = np.random.default_rng(0)
    inside = ball()
    scan = np.abs(np.where(inside, 100.0, 0.0) + rng.normal(0, 5.0, inside.shape))  # a magnitude image
    assert image_quality(scan, (1.0, 1.0, 1.0))["noise"] == pytest.approx(0.05, rel=0.05)


@pytest.mark.parametrize("sigma_mm", [1.5, 2.5])
def test_fwhm_of_smoothed_white_noise_on_an_anisotropic_grid(sigma_mm):
    rng = np.random.default_rng(1)
    spacing = (1.0, 1.0, 2.0)  # (I, J, K) mm: the K axis (first array axis) is twice as coarse
    noise = ndimage.gaussian_filter(rng.normal(0, 1, (48, 96, 96)), sigma=(sigma_mm / 2, sigma_mm, sigma_mm))
    scan = np.where(ball((48, 96, 96), 0.9), 100.0, 0.0) + 20.0 * noise / noise.std()
    expected = 2.0 * math.sqrt(2.0 * math.log(2.0)) * sigma_mm
    assert image_quality(scan, spacing)["fwhm_mm"] == pytest.approx(expected, rel=0.12)


def test_dark_ratio_is_the_tenth_percentile_over_the_median():
    scan = np.zeros((60, 60, 60))
    scan[15:45, 15:45, 15:45] = 100.0
    scan[15:21, 15:45, 15:45] = 60.0  # 6 of the 30 foreground slices: 20 % of the foreground
    scores = image_quality(scan, (1.0, 1.0, 1.0))
    assert scores["dark_ratio"] == pytest.approx(0.6)
    assert scores["noise"] == 0.0  # piecewise constant: the residual's median absolute deviation is zero


def test_scores_do_not_depend_on_the_intensity_scale_and_the_input_is_untouched():
    rng = np.random.default_rng(2)
    scan = np.where(ball(), 80.0, 0.0) + ndimage.gaussian_filter(rng.normal(0, 4.0, ball().shape), 1.0)
    before = scan.copy()
    scores = image_quality(scan, (1.0, 1.0, 1.0))
    np.testing.assert_array_equal(scan, before)
    scaled = image_quality(3.0 * scan, (1.0, 1.0, 1.0))
    assert scaled == pytest.approx(scores, rel=1e-9)


def test_a_constant_scan_has_undefined_scores():
    scores = image_quality(np.full((20, 20, 20), 7.0), (1.0, 1.0, 1.0))
    assert set(scores) == set(IMAGE_SCORES) and all(math.isnan(v) for v in scores.values())


def test_cohort_outliers_use_the_median_and_mad():
    cohort = [{"noise": 0.020 + 0.001 * (n % 3), "fwhm_mm": 2.0, "dark_ratio": 0.6 + 0.01 * (n % 4)}
              for n in range(9)]
    cohort.append({"noise": 0.050, "fwhm_mm": 2.0, "dark_ratio": 0.61})  # noisier than every other case
    cohort.append({"noise": 0.021, "fwhm_mm": 2.9, "dark_ratio": math.nan})  # smoother; contrast unknown
    reasons = cohort_outliers(cohort)
    assert [bool(r) for r in reasons] == [False] * 9 + [True, True]
    assert len(reasons[9]) == 1 and "noise" in reasons[9][0] and "median 0.021" in reasons[9][0]
    # fwhm_mm is 2.0 for all but one case: its MAD is 0, so the mean absolute deviation scales it
    assert len(reasons[10]) == 1 and "smoothness" in reasons[10][0]
    # a cohort too small to have a median worth the name calls nothing
    small = cohort[:MIN_COHORT - 2] + cohort[9:10]
    assert cohort_outliers(small) == [[]] * len(small)


@pytest.mark.slow
def test_degraded_copies_of_real_lesion_cases_stand_out_and_clean_ones_do_not():
    from SegXAILib.data.degrade import degrade
    from SegXAILib.data.lesion import synthesize_lesion
    from SegXAILib.data.samples import default_demo_host, load_host

    host = load_host(default_demo_host())
    clean = [synthesize_lesion(host, seed=seed).image for seed in range(30001, 30009)]
    degraded = [degrade(clean[n], kind, seed=n) for n, kind in enumerate(("noise", "blur", "gamma"))]
    reasons = cohort_outliers([image_quality(v.array, v.spacing) for v in clean + degraded])
    assert [bool(r) for r in reasons] == [False] * 8 + [True] * 3
    noisy, blurred, _ = (" ".join(r) for r in reasons[8:])
    assert "noise (1/SNR)" in noisy and "smoothness" in blurred
