"""The registered Colin27 brain, and the brain mask of heads whose brain joins a neck thickly."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from SegXAILib.data import atlas_brain as atlas_module
from SegXAILib.data import brain_mask, samples
from SegXAILib.data.atlas_brain import atlas_brain
from SegXAILib.data.brain_mask import estimate_brain_mask
from SegXAILib.volume import Volume

pytestmark = pytest.mark.skipif(not (samples.MRICRON_TEMPLATES / "ch2.nii.gz").is_file(),
                                reason="Debian's mricron-data is not installed")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def _moved(volume: Volume, transform: sitk.Transform, interpolator=sitk.sitkLinear) -> Volume:
    """``volume`` resampled through ``transform`` (output point -> input point) onto its own grid."""
    image = volume.to_sitk()
    return Volume.from_sitk(sitk.Resample(image, image, transform, interpolator, 0.0, image.GetPixelID()))


@pytest.mark.slow
def test_atlas_brain_follows_a_moved_scaled_head():
    head, brain = samples.colin27_t1(), samples.colin27_brain()
    # a smaller, rotated, shifted head: every point p of the new scan shows the old head at A p + t
    transform = sitk.AffineTransform(3)
    rotation = np.array(sitk.VersorTransform((0.2, 1.0, 0.1), np.deg2rad(10)).GetMatrix()).reshape(3, 3)
    transform.SetMatrix((rotation / 0.88).ravel().tolist())
    transform.SetCenter(head.to_sitk().TransformContinuousIndexToPhysicalPoint([90, 108, 90]))
    transform.SetTranslation((6.0, -9.0, 4.0))
    moved = _moved(head, transform)
    truth = _moved(Volume((brain.array > 0).astype(np.uint8), brain.spacing, brain.origin, brain.direction),
                   transform, sitk.sitkNearestNeighbor).array > 0
    placed = atlas_brain(moved)
    assert placed.shape == moved.shape and placed.dtype == bool
    assert _dice(placed, truth) > 0.95
    assert np.array_equal(placed, atlas_brain(moved))  # one thread, every voxel: the same mask every time


def _with_neck(head: Volume, brain: np.ndarray, length: int = 50) -> tuple[Volume, np.ndarray, np.ndarray]:
    """Colin27 grown ``length`` voxels downwards, with a neck of white-matter brightness 30 mm across joined to its
    brainstem; returns the head, its brain and the neck's voxels more than 10 mm below the brain."""
    assert np.allclose(head.direction, np.eye(3))  # K runs upwards: the new slices go below
    pad = ((length, 0), (0, 0), (0, 0))
    array, brain = np.pad(head.array, pad), np.pad(brain, pad)
    k, j, i = np.indices(array.shape)
    stem = np.argwhere(brain)
    bottom = stem[:, 0].min()
    centre_j, centre_i = stem[stem[:, 0] < bottom + 15, 1:].mean(0)
    neck = (k < bottom + 25) & ((j - centre_j) ** 2 + (i - centre_i) ** 2 < 15**2) & ~brain
    array[neck] = np.percentile(head.array[brain[length:]], 85)
    origin = head.origin - head.direction @ (np.array([0, 0, length]) * head.spacing)
    return Volume(array, head.spacing, origin, head.direction), brain, neck & (k < bottom - 10)


@pytest.mark.slow
def test_a_brain_joined_to_a_neck_is_cut_from_it_by_the_atlas(monkeypatch):
    necked, brain, neck = _with_neck(samples.colin27_t1(), samples.colin27_brain().array > 0)
    mask = estimate_brain_mask(necked)
    assert not (mask & neck).any()  # the atlas brain's margin (8 mm) is all that may hang below the brain
    assert _dice(mask, brain) > 0.93
    # thresholds and openings alone keep much of the neck: the atlas is what cuts it
    monkeypatch.setattr(brain_mask, "SCALP_FRACTION", np.inf)
    assert (estimate_brain_mask(necked) & neck).sum() > 0.3 * neck.sum()


@pytest.mark.slow
def test_skull_stripped_brains_and_colin27_keep_the_thresholded_mask(monkeypatch):
    head = samples.colin27_t1()
    with_atlas = estimate_brain_mask(head)
    stripped = samples.colin27_brain()
    calls = []
    monkeypatch.setattr(brain_mask, "_within_atlas_brain", lambda *args: calls.append(1) or args[1])
    assert np.array_equal(estimate_brain_mask(head), with_atlas)  # Colin27 is the atlas: nothing to cut
    estimate_brain_mask(stripped)
    assert calls == [1]  # the head is checked against the atlas, the skull-stripped brain is not


def test_without_mricron_data_there_is_no_atlas_and_the_mask_is_thresholded(monkeypatch, tmp_path):
    head = samples.colin27_t1()
    atlas_module._atlas.cache_clear()
    monkeypatch.setattr(samples, "MRICRON_TEMPLATES", tmp_path)
    try:
        assert atlas_brain(head) is None
        monkeypatch.setattr(brain_mask, "SCALP_FRACTION", np.inf)
        without_atlas = estimate_brain_mask(head)
        monkeypatch.undo()
        monkeypatch.setattr(samples, "MRICRON_TEMPLATES", tmp_path)
        assert np.array_equal(estimate_brain_mask(head), without_atlas)
    finally:
        atlas_module._atlas.cache_clear()
