"""Degraded copies: each kind does what its strength says, by seed, on the scan's grid."""

from __future__ import annotations

import numpy as np
import pytest

from SegXAILib.cli import main as segxai
from SegXAILib.data.degrade import DEGRADATIONS, degrade
from SegXAILib.errors import SegXAIError
from SegXAILib.volume import Volume, read_volume, write_volume


@pytest.fixture
def phantom() -> Volume:
    """A head-like phantom: a bright ball (tissue level 100) in a dark field, anisotropic voxels."""
    k, j, i = np.mgrid[:40, :48, :48]
    ball = (k - 20) ** 2 / 16**2 + (j - 24) ** 2 / 20**2 + (i - 24) ** 2 / 20**2 < 1
    return Volume(np.where(ball, 100.0, 5.0).astype(np.float32), spacing=(1.0, 1.0, 2.0))


@pytest.mark.parametrize("kind", DEGRADATIONS)
def test_same_grid_same_seed_same_copy_input_untouched(phantom: Volume, kind: str) -> None:
    before = phantom.array.copy()
    first, again = degrade(phantom, kind, seed=3), degrade(phantom, kind, seed=3)
    assert first.same_grid(phantom) and first.array.dtype == np.float32
    np.testing.assert_array_equal(first.array, again.array)
    np.testing.assert_array_equal(phantom.array, before)
    assert not np.allclose(first.array, phantom.array)


def test_gaussian_noise_std_is_strength_times_tissue_level(phantom: Volume) -> None:
    shifted = phantom.with_array(phantom.array - 50.0)  # negative values: not a magnitude image, so Gaussian
    noisy = degrade(shifted, "noise", 0.2, seed=0).array - shifted.array
    assert noisy.std() == pytest.approx(0.2 * 50.0, rel=0.02)  # tissue level 100 - 50
    assert abs(noisy.mean()) < 0.5


def test_rician_noise_is_magnitude_noise(phantom: Volume) -> None:
    noisy = degrade(phantom, "noise", 0.2, seed=0).array
    assert noisy.min() >= 0
    tissue = noisy[phantom.array == 100.0]
    # Rician at SNR 5: mean sqrt(A^2 + sigma^2) ~ A (1 + 1 / (2 SNR^2)), std ~ sigma
    assert tissue.mean() == pytest.approx(100.0 * (1 + 0.5 / 25), rel=0.01)
    assert tissue.std() == pytest.approx(20.0, rel=0.03)


def test_blur_has_the_asked_fwhm_in_mm_per_axis() -> None:
    delta = np.zeros((41, 41, 41), np.float32)
    delta[20, 20, 20] = 1.0
    scan = Volume(delta, spacing=(0.5, 1.0, 1.0))  # (i, j, k) spacing: i finer than j and k
    blurred = degrade(scan, "blur", 6.0).array
    sigma_mm = 6.0 / (2 * np.sqrt(2 * np.log(2)))
    offsets = np.arange(41) - 20
    for axis, step in zip(range(3), scan.spacing[::-1]):
        profile = blurred.sum(axis=tuple(a for a in range(3) if a != axis))
        variance = np.sum(profile * (offsets * step) ** 2) / profile.sum()
        assert np.sqrt(variance) == pytest.approx(sigma_mm, rel=0.02)


def test_bias_field_is_smooth_and_spans_plus_minus_strength(phantom: Volume) -> None:
    log_field = np.log(degrade(phantom, "bias", 0.3, seed=1).array / phantom.array)
    assert log_field.max() == pytest.approx(0.3, abs=1e-5) and log_field.min() == pytest.approx(-0.3, abs=1e-5)
    assert np.abs(np.diff(log_field, axis=2)).max() < 0.05  # no edges: a coil's field is smooth


def test_gamma_keeps_the_tissue_level_and_compresses_contrast(phantom: Volume) -> None:
    array = phantom.array.copy()
    array[0, 0, :4] = [0.0, 25.0, 100.0, 400.0]
    out = degrade(phantom.with_array(array), "gamma", 0.5).array
    np.testing.assert_allclose(out[0, 0, :4], [0.0, 50.0, 100.0, 200.0], rtol=1e-5)


@pytest.mark.parametrize(("kind", "strength", "message"), [
    ("smudge", None, "unknown degradation 'smudge'"),
    ("blur", -1.0, "must be >= 0"),
    ("gamma", 0.0, "must be > 0"),
])
def test_bad_degradations_are_refused(phantom: Volume, kind: str, strength: float | None, message: str) -> None:
    with pytest.raises(SegXAIError, match=message):
        degrade(phantom, kind, strength)


def test_constant_scan_has_nothing_to_degrade() -> None:
    with pytest.raises(SegXAIError, match="no foreground"):
        degrade(Volume(np.full((8, 8, 8), 7.0, np.float32)), "noise")


def test_command_writes_a_copy_and_never_overwrites_the_input(phantom: Volume, tmp_path, capsys) -> None:
    scan = write_volume(phantom, tmp_path / "scan.nrrd")
    assert segxai(["degrade", str(scan), "--kind", "blur", "--out", str(tmp_path / "blurred.nii.gz")]) == 0
    blurred = read_volume(tmp_path / "blurred.nii.gz")
    assert blurred.same_grid(phantom) and np.abs(blurred.array - phantom.array).max() > 10  # the edge is smoothed
    assert segxai(["degrade", str(scan), "--kind", "noise", "--out", str(scan)]) == 2
    assert "is the input scan" in capsys.readouterr().err
    np.testing.assert_array_equal(read_volume(scan).array, phantom.array)
