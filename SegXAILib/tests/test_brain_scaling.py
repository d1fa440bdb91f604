"""Brain-size normalisation of the model grid (card preprocessing ``brain_volume_ml``)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from SegXAILib.data import samples
from SegXAILib.data.brain_mask import estimate_brain_mask
from SegXAILib.errors import SegXAIError
from SegXAILib.preprocessing import BrainMask, brain_scaled_spacing, preprocess
from SegXAILib.volume import Volume

SPACING = (1.5, 1.5, 1.5)


@pytest.fixture(scope="module")
def mni() -> Volume:
    return samples.mni152_t1()


def brain_ml(volume: Volume) -> float:
    return float(estimate_brain_mask(volume).sum() * np.prod(volume.spacing) / 1000.0)


@pytest.mark.slow
def test_spacing_follows_the_cube_root_of_the_brain_volume(mni: Volume) -> None:
    measured = brain_ml(mni)
    assert 1200 < measured < 2200  # an adult human brain (the mask keeps some CSF)
    assert np.allclose(brain_scaled_spacing(BrainMask(mni), SPACING, measured), SPACING, rtol=1e-12)
    assert np.allclose(brain_scaled_spacing(BrainMask(mni), SPACING, measured / 8), np.multiply(SPACING, 2), rtol=1e-12)
    assert np.allclose(brain_scaled_spacing(BrainMask(mni), SPACING, measured * 27 / 8), np.multiply(SPACING, 2 / 3),
                       rtol=1e-12)


@pytest.mark.slow
def test_a_half_size_head_reaches_the_model_grid_like_the_full_size_one(mni: Volume) -> None:
    small = replace(mni, spacing=mni.spacing * 0.5)  # the same head at half its size
    spec = {"orientation": "RAS", "spacing": list(SPACING), "intensity": {"kind": "zscore_foreground"},
            "brain_volume_ml": 1700.0}
    full_grid, small_grid = preprocess(mni, spec), preprocess(small, spec)
    assert np.allclose(small_grid.spacing / full_grid.spacing, 0.5, rtol=0.02)
    assert np.all(np.abs(np.subtract(small_grid.shape, full_grid.shape)) <= 0.02 * np.array(full_grid.shape) + 1)
    # without the option, the small head would fill an eighth of the voxels
    plain = {key: value for key, value in spec.items() if key != "brain_volume_ml"}
    assert np.prod(preprocess(small, plain).shape) < 0.15 * np.prod(full_grid.shape)


def test_a_scan_without_a_brain_of_plausible_size_is_refused() -> None:
    array = np.zeros((40, 40, 40), np.float32)
    array[18:22, 18:22, 18:22] = 100.0  # a 4 mm cube: 0.064 mL of "brain"
    array += np.random.default_rng(0).normal(0, 1, array.shape).astype(np.float32)
    with pytest.raises(SegXAIError, match="mL.*expects"):
        brain_scaled_spacing(BrainMask(Volume(array, spacing=(1.0, 1.0, 1.0))), SPACING, 1700.0)
