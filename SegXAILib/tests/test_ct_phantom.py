"""The synthetic abdominal CT: HU per tissue, labels, geometry, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from SegXAILib.data.ct_phantom import HU, LABEL_LESION, LABEL_ORGAN, LESION_HU, ct_phantom


@pytest.fixture(scope="module")
def phantom():
    return ct_phantom(seed=0)


def test_types_and_geometry(phantom) -> None:
    image, label = phantom
    assert image.array.dtype == np.int16 and label.array.dtype == np.uint8
    assert image.shape == label.shape == (64, 128, 128)
    assert image.same_grid(label)
    np.testing.assert_allclose(image.spacing, (0.8, 0.8, 2.5))
    center = image.ijk_to_ras @ np.append((np.array(image.shape[::-1]) - 1) / 2, 1.0)
    np.testing.assert_allclose(center[:3], 0.0, atol=1e-9)  # the grid is centred on RAS (0, 0, 0)


def test_hounsfield_units_per_tissue(phantom) -> None:
    image, label = phantom
    hu = image.array.astype(np.float64)
    organ, lesion = label.array == LABEL_ORGAN, label.array == LABEL_LESION
    # away from edges (partial volume), each tissue is its mean HU plus ~10 HU noise
    organ_core = ndimage.binary_erosion(organ, iterations=2)
    lesion_core = ndimage.binary_erosion(lesion)
    assert abs(np.median(hu[organ_core]) - HU["organ"]) <= 2
    assert 7 < hu[organ_core].std() < 13
    assert LESION_HU[0] - 3 <= np.median(hu[lesion_core]) <= LESION_HU[1] + 3
    assert np.median(hu[organ_core]) - np.median(hu[lesion_core]) > 25  # hypodense
    corner = hu[:, :8, :8]  # outside the body
    assert abs(corner.mean() - HU["air"]) < 3 and corner.std() < 13
    assert hu.min() >= -1024 and hu.max() < 800
    # every tissue is present in bulk: voxels within 25 HU of its mean
    for tissue, fraction in (("lung", 0.01), ("fat", 0.03), ("soft_tissue", 0.1), ("bone", 0.002)):
        assert np.mean(np.abs(hu - HU[tissue]) < 25) > fraction, tissue


def test_lesion_inside_organ(phantom) -> None:
    _, label = phantom
    organ_or_lesion = label.array > 0
    lesion = label.array == LABEL_LESION
    assert lesion.sum() > 100
    assert ndimage.label(lesion)[1] == 1
    # surrounded by organ: the lesion's outer neighbours are all organ
    ring = ndimage.binary_dilation(lesion) & ~lesion
    assert np.all(label.array[ring] == LABEL_ORGAN)
    assert ndimage.binary_fill_holes(organ_or_lesion).sum() == organ_or_lesion.sum()


def test_deterministic_by_seed() -> None:
    a_image, a_label = ct_phantom(seed=3)
    b_image, b_label = ct_phantom(seed=3)
    c_image, c_label = ct_phantom(seed=4)
    np.testing.assert_array_equal(a_image.array, b_image.array)
    np.testing.assert_array_equal(a_label.array, b_label.array)
    assert not np.array_equal(a_label.array, c_label.array)


def test_other_shape_and_spacing() -> None:
    image, label = ct_phantom(shape=(40, 96, 80), spacing=(1.0, 1.2, 3.0), seed=1)
    assert image.shape == label.shape == (40, 96, 80)
    np.testing.assert_allclose(image.spacing, (1.0, 1.2, 3.0))
    assert {0, LABEL_ORGAN, LABEL_LESION} == set(np.unique(label.array))
