"""Synthetic brain tumours: determinism, labels, placement in the brain, intensities, geometry."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from SegXAILib.data import samples
from SegXAILib.data.brain_mask import estimate_brain_mask
from SegXAILib.data.lesion import (
    ADULT_BRAIN_ML,
    BRATS_LABELS,
    LABEL_ED,
    LABEL_ET,
    LABEL_NCR,
    synthesize_lesion,
    write_case,
)
from SegXAILib.errors import SegXAIError
from SegXAILib.volume import Volume, read_volume

COLIN27 = samples.MRICRON_TEMPLATES / "ch2.nii.gz"
needs_colin27 = pytest.mark.skipif(not COLIN27.is_file(), reason="Debian's mricron-data is not installed")


@pytest.fixture(scope="module")
def mni() -> Volume:
    return samples.mni152_t1()


@pytest.fixture(scope="module")
def mni_mask(mni: Volume) -> np.ndarray:
    return estimate_brain_mask(mni)


@pytest.fixture(scope="module")
def colin() -> tuple[Volume, np.ndarray]:
    """Colin27 with skull, and its reference brain mask (ch2bet > 0)."""
    if not COLIN27.is_file():
        pytest.skip("Debian's mricron-data is not installed")
    return samples.colin27_t1(), samples.colin27_brain().array > 0


def _oblique(host: Volume, angle_deg: float, spacing: tuple[float, float, float]) -> Volume:
    """``host`` resampled onto a rotated, anisotropic grid that covers the same anatomy."""
    image = host.to_sitk()
    rotation = sitk.VersorTransform((0.3, 1.0, 0.2), np.deg2rad(angle_deg)).GetMatrix()
    direction = np.array(rotation).reshape(3, 3) @ np.array(image.GetDirection()).reshape(3, 3)
    extent = np.array(image.GetSize()) * np.array(image.GetSpacing())
    size = np.ceil(extent * 1.1 / np.array(spacing)).astype(int)
    center = np.array(image.TransformContinuousIndexToPhysicalPoint((np.array(image.GetSize()) - 1) / 2))
    origin = center - direction @ ((size - 1) / 2 * np.array(spacing))
    resampled = sitk.Resample(image, [int(n) for n in size], sitk.Transform(), sitk.sitkLinear,
                              origin.tolist(), spacing, direction.ravel().tolist(), 0.0, image.GetPixelID())
    return Volume.from_sitk(resampled)


def test_same_seed_same_case_other_seed_other_place(mni: Volume, mni_mask: np.ndarray) -> None:
    a = synthesize_lesion(mni, seed=7, brain_mask=mni_mask)
    b = synthesize_lesion(mni, seed=7, brain_mask=mni_mask)
    c = synthesize_lesion(mni, seed=8, brain_mask=mni_mask)
    np.testing.assert_array_equal(a.image.array, b.image.array)
    np.testing.assert_array_equal(a.label.array, b.label.array)
    np.testing.assert_array_equal(a.center_ras, b.center_ras)
    assert np.linalg.norm(a.center_ras - c.center_ras) > 1.0
    assert not np.array_equal(a.label.array, c.label.array)


@needs_colin27
@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.slow
def test_colin27_case_labels_placement_intensities(colin: tuple[Volume, np.ndarray], seed: int) -> None:
    host, brain = colin
    before = host.array.copy()
    case = synthesize_lesion(host, seed=seed, brain_mask=brain)
    label, image = case.label.array, case.image.array.astype(np.float64)

    np.testing.assert_array_equal(host.array, before)  # the host is never modified
    assert case.label.same_grid(host) and case.image.same_grid(host)
    assert label.dtype == np.uint8
    assert set(np.unique(label)) == {0, *BRATS_LABELS}
    assert not np.any(label[~brain])
    # tumour core {1, 4} is enclosed by the edema: its outside neighbours are edema, not brain
    core = np.isin(label, (LABEL_NCR, LABEL_ET))
    assert np.all(label[ndimage.binary_dilation(core) & ~core] == LABEL_ED)

    wm = np.percentile(host.array[brain], 85)
    means = {lab: image[label == lab].mean() for lab in BRATS_LABELS}
    assert means[LABEL_ET] > wm > means[LABEL_ED] > means[LABEL_NCR]
    assert 0.3 * wm < means[LABEL_NCR] < 0.55 * wm
    # outside the lesion's partial-volume edge, the image is the host's
    far = ndimage.distance_transform_edt(label == 0) > 3
    np.testing.assert_array_equal(image[far], host.array[far])


@needs_colin27
@pytest.mark.slow
def test_colin27_estimated_mask_contains_lesion(colin: tuple[Volume, np.ndarray]) -> None:
    host, brain = colin
    case = synthesize_lesion(host, seed=11)
    lesion = case.label.array > 0
    assert lesion.sum() > 1000
    assert not np.any(lesion & ~estimate_brain_mask(host))
    assert (lesion & ~brain).sum() < 0.005 * lesion.sum()  # the estimated mask is inside the real brain


@needs_colin27
@pytest.mark.slow
def test_brain_mask_with_skull_matches_ch2bet(colin: tuple[Volume, np.ndarray]) -> None:
    host, brain = colin
    mask = estimate_brain_mask(host)
    assert mask.dtype == bool and mask.shape == host.shape
    dice = 2 * (mask & brain).sum() / (mask.sum() + brain.sum())
    assert dice > 0.93  # 0.966 achieved
    scalp = ndimage.distance_transform_edt(~brain) > 3  # more than 3 mm outside the brain
    assert (mask & scalp).sum() < 0.005 * mask.sum()  # 0.04 % achieved


def test_brain_mask_skull_stripped_mni(mni: Volume, mni_mask: np.ndarray) -> None:
    brain = mni.array > 0
    dice = 2 * (mni_mask & brain).sum() / (mni_mask.sum() + brain.sum())
    assert dice > 0.95  # 0.977 achieved
    assert not np.any(mni_mask & ~ndimage.binary_dilation(brain, iterations=2))


def test_oblique_anisotropic_host(mni: Volume) -> None:
    host = _oblique(mni, angle_deg=25.0, spacing=(1.3, 0.9, 2.0))
    assert not np.allclose(host.direction, np.diag(np.sign(np.diag(host.direction))))
    case = synthesize_lesion(host, seed=5)
    assert case.label.same_grid(host) and case.image.same_grid(host)
    assert set(np.unique(case.label.array)) == {0, *BRATS_LABELS}
    # the centre, mapped back through RAS, is in the brain of the original MNI grid
    ijk = np.linalg.inv(mni.ijk_to_ras) @ np.append(case.center_ras, 1.0)
    i, j, k = np.rint(ijk[:3]).astype(int)
    assert mni.array[k, j, i] > 0
    # every lesion voxel, mapped to the original grid, lands in the brain (1-voxel tolerance)
    kji = np.argwhere(case.label.array > 0)
    ras = host.ijk_to_ras @ np.c_[kji[:, ::-1], np.ones(len(kji))].T
    ijk = np.rint(np.linalg.inv(mni.ijk_to_ras) @ ras)[:3].astype(int)
    dilated = ndimage.binary_dilation(mni.array > 0)
    assert dilated[ijk[2], ijk[1], ijk[0]].mean() > 0.999


@pytest.mark.parametrize("intensity", ["unit", "zscore"])
def test_small_float_host_scales_lesion_down(mni: Volume, intensity: str) -> None:
    # a macaque-sized brain (~70 mm wide), 0.5 mm voxels, float intensities in [0, 1] or z-scored
    array = mni.array[: mni.shape[0] // 2 * 2, : mni.shape[1] // 2 * 2, : mni.shape[2] // 2 * 2].astype(np.float32)
    array = array.reshape(array.shape[0] // 2, 2, array.shape[1] // 2, 2, array.shape[2] // 2, 2).mean(axis=(1, 3, 5))
    array = array / array.max() if intensity == "unit" else (array - array.mean()) / array.std()
    host = Volume(array, spacing=(0.5, 0.5, 0.5), origin=mni.origin / 4, direction=mni.direction)
    mask = estimate_brain_mask(host)
    case = synthesize_lesion(host, seed=2, brain_mask=mask)
    label, image = case.label.array, case.image.array
    assert image.dtype == np.float32
    assert case.params["scale"] < 1.0
    assert set(np.unique(label)) == {0, *BRATS_LABELS}
    assert not np.any(label[~mask])
    means = {lab: image[label == lab].mean() for lab in BRATS_LABELS}
    assert means[LABEL_ET] > case.params["wm_level"] > means[LABEL_ED] > means[LABEL_NCR]


def test_lesion_takes_the_same_share_of_a_smaller_brain(mni: Volume, mni_mask: np.ndarray) -> None:
    # the same head at half the size (1/8 of the volume): the lesion shrinks with the brain, so it
    # covers about as many voxels; a physical-size lesion would cover 8 times as many
    small = Volume(mni.array, mni.spacing * 0.5, mni.origin * 0.5, mni.direction)
    adult, child = (synthesize_lesion(host, seed=1, brain_mask=mni_mask) for host in (mni, small))
    assert adult.params["brain_volume_ml"] > ADULT_BRAIN_ML and adult.params["scale"] == 1.0
    assert child.params["brain_volume_ml"] == pytest.approx(adult.params["brain_volume_ml"] / 8)
    expected = (child.params["brain_volume_ml"] / ADULT_BRAIN_ML) ** (1 / 3)
    assert child.params["scale"] == pytest.approx(expected)
    voxels = [np.count_nonzero(case.label.array) for case in (adult, child)]
    assert voxels[1] / voxels[0] == pytest.approx((expected / 0.5) ** 3, rel=0.05)
    # adult lengths on request (a training set's shrunken heads): as large as the small brain holds
    large = synthesize_lesion(small, seed=1, brain_mask=mni_mask, brain_scale=1.0)
    assert large.params["scale"] > 1.2 * expected and np.count_nonzero(large.label.array) > 1.5 * voxels[1]


def test_integer_host_dtype_kept_only_when_values_fit(mni: Volume, mni_mask: np.ndarray) -> None:
    case = synthesize_lesion(mni, seed=1, brain_mask=mni_mask)  # MNI's WM ~ 217: the rim exceeds 255
    assert case.image.array.dtype == np.float32 and case.image.array.max() > 255
    dim = mni.with_array((mni.array // 2).astype(np.uint8))  # WM ~ 110: every value fits
    assert synthesize_lesion(dim, seed=1, brain_mask=mni_mask).image.array.dtype == np.uint8


def test_write_case_round_trip(mni: Volume, mni_mask: np.ndarray, tmp_path) -> None:
    case = synthesize_lesion(mni, seed=3, brain_mask=mni_mask)
    image_path, label_path = write_case(case, tmp_path / "case_003")
    assert image_path.name == "image.nii.gz" and label_path.name == "label.nii.gz"
    label = read_volume(label_path)
    assert label.same_grid(mni)
    np.testing.assert_array_equal(label.array, case.label.array)
    np.testing.assert_allclose(read_volume(image_path).array, case.image.array)


def test_sample_hosts_errors(monkeypatch, tmp_path) -> None:
    with pytest.raises(SegXAIError, match="mni152"):
        samples.load_host("nope")
    monkeypatch.setattr(samples, "MRICRON_TEMPLATES", tmp_path)
    with pytest.raises(SegXAIError, match="mricron-data"):
        samples.load_host("colin27")
    assert set(samples.SAMPLE_HOSTS) == {"mni152", "colin27", "colin27-brain"}
    with pytest.raises(SegXAIError, match="mricron-data"):
        samples.load_host("colin27-brain")
    assert samples.default_demo_host() == "mni152"
