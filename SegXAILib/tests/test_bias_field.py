"""N4 bias-field correction (card ``preprocessing.bias_field``) on heads with a known field."""

from __future__ import annotations

import numpy as np
import pytest

from SegXAILib.bias_field import correct_bias_field
from SegXAILib.errors import SegXAIError
from SegXAILib.models.card import ModelCard
from SegXAILib.preprocessing import preprocess
from SegXAILib.volume import Volume

SPACING_MM = 2.0
SHAPE = (64, 72, 64)
WM, GM = 100.0, 70.0


def two_tissue_head() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intensities of a head (white-matter ellipsoid in a grey-matter one, dark background) and
    its two tissue masks; shape (K, J, I), 2 mm voxels."""
    k, j, i = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in SHAPE], indexing="ij")
    r = np.sqrt((k / 28) ** 2 + (j / 33) ** 2 + (i / 28) ** 2)
    wm, gm = r < 0.6, (r >= 0.6) & (r < 0.95)
    array = np.where(wm, WM, np.where(gm, GM, 3.0)) + np.random.default_rng(0).normal(0, 1.5, SHAPE)
    return array.astype(np.float32), wm, gm


def smooth_field(strength: float) -> np.ndarray:
    """A multiplicative field, ``exp(strength * smooth function in [-1.2, 1.2])``, like a receive coil's."""
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    return np.exp(strength * (0.7 * j + 0.5 * k * i)).astype(np.float32)


def spread(array: np.ndarray, tissue: np.ndarray) -> float:
    """Coefficient of variation of a tissue (its two-voxel-eroded core: away from partial volume)."""
    from scipy import ndimage

    core = ndimage.binary_erosion(tissue, iterations=2)
    return float(array[core].std() / array[core].mean())


def test_a_known_field_is_removed_and_the_tissue_contrast_kept():
    clean, wm, gm = two_tissue_head()
    biased = clean * smooth_field(0.8)
    assert spread(biased, wm) > 0.12 and spread(biased, gm) > 0.2  # noise alone: 0.015 and 0.021

    corrected = correct_bias_field(Volume(biased, spacing=(SPACING_MM,) * 3))
    assert spread(corrected.array, wm) < 0.03 and spread(corrected.array, gm) < 0.04
    contrast = np.median(corrected.array[gm]) / np.median(corrected.array[wm])
    assert contrast == pytest.approx(GM / WM, abs=0.04)
    # the field is normalised to mean 1 in the head: the overall scale is kept
    assert np.median(corrected.array[wm]) == pytest.approx(np.median(biased[wm]), rel=0.15)


def test_a_scan_without_a_field_is_left_nearly_as_it_was_and_never_modified():
    clean, wm, _ = two_tissue_head()
    volume = Volume(clean.copy(), spacing=(SPACING_MM,) * 3, origin=(5.0, -3.0, 2.0))
    corrected = correct_bias_field(volume)
    assert np.array_equal(volume.array, clean)
    assert corrected.array.dtype == np.float32 and corrected.shape == volume.shape
    np.testing.assert_array_equal(corrected.ijk_to_ras, volume.ijk_to_ras)
    ratio = corrected.array[wm] / clean[wm]
    assert float(ratio.std() / ratio.mean()) < 0.03


def test_preprocessing_corrects_only_when_the_card_asks():
    clean, wm, _ = two_tissue_head()
    biased = Volume(clean * smooth_field(0.8), spacing=(SPACING_MM,) * 3)
    spec = {"spacing": None, "intensity": {"kind": "zscore_foreground"}}
    plain = preprocess(biased, spec).array
    corrected = preprocess(biased, spec | {"bias_field": "n4"}).array
    # z-scores have mean ~0, so the spread is measured on the range that white matter spans
    assert np.ptp(np.percentile(corrected[wm], [5, 95])) < 0.5 * np.ptp(np.percentile(plain[wm], [5, 95]))


def test_an_unknown_correction_in_a_card_is_named():
    card = {"name": "m", "architecture": {"name": "unet", "args": {}}, "input": {"channels": 1},
            "classes": [{"name": "background", "label": 0}, {"name": "lesion", "label": 1}],
            "preprocessing": {"bias_field": "n3"}, "patch_size": [32, 32, 32]}
    with pytest.raises(SegXAIError, match="unknown bias_field correction 'n3'"):
        ModelCard.from_dict(card)
