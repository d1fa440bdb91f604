"""Keeping a brain-lesion model's foreground inside the brain (card ``postprocessing``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from SegXAILib.cli import main
from SegXAILib.data.brain_mask import estimate_brain_mask
from SegXAILib.inference import segment
from SegXAILib.models.card import ModelCard
from SegXAILib.models.registry import load_model
from SegXAILib.postprocessing import drop_pieces_outside_brain, restrict_to_brain
from SegXAILib.volume import Volume, write_volume

RADIUS_MM = 30.0
SPACING_MM = 2.0


def ball_head(shape=(48, 48, 48)) -> tuple[Volume, np.ndarray]:
    """A bright ball of brain (radius 30 mm) in a dark, noisy background; and each voxel's distance to its
    centre (mm)."""
    rng = np.random.default_rng(0)
    centre = (np.array(shape) - 1) / 2
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    radius = SPACING_MM * np.sqrt((k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2)
    array = np.where(radius < RADIUS_MM, 100.0, 5.0) + rng.normal(0, 2, shape)
    return Volume(array.astype(np.float32), spacing=(SPACING_MM,) * 3), radius


@pytest.mark.parametrize("margin", [0.0, 10.0])
def test_foreground_is_kept_inside_the_brain_and_its_margin_only(margin):
    volume, radius = ball_head()
    probabilities = np.full((3,) + volume.shape, 1 / 3, dtype=np.float32)
    restrict_to_brain(probabilities, estimate_brain_mask(volume), volume.spacing, margin, background=0)
    outside = radius > RADIUS_MM + margin + 2 * SPACING_MM  # beyond the ball, its margin and a voxel's blur
    inside = radius < RADIUS_MM - 2 * SPACING_MM
    assert np.all(probabilities[1:, outside] == 0) and np.all(probabilities[0, outside] == 1)
    assert np.all(probabilities[:, inside] == np.float32(1 / 3))  # untouched where the brain is
    np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-6)
    kept = probabilities[1] > 0
    assert radius[kept].max() == pytest.approx(RADIUS_MM + margin, abs=2 * SPACING_MM)


def _cube(probabilities, corner, size, channel):
    """Make the cube ``size`` voxels wide at ``corner`` class ``channel`` (probability 0.7 of 3 classes)."""
    k, j, i = corner
    probabilities[:, k:k + size, j:j + size, i:i + size] = 0.15
    probabilities[channel, k:k + size, j:j + size, i:i + size] = 0.7


def test_pieces_mostly_outside_the_brain_are_dropped_whole():
    brain = np.zeros((20, 20, 20), dtype=bool)
    brain[:, :10] = True  # the brain is the half j < 10
    probabilities = np.zeros((3, 20, 20, 20), dtype=np.float32)
    probabilities[0] = 1.0
    _cube(probabilities, (2, 6, 2), 4, channel=1)  # j 6..9: all inside
    _cube(probabilities, (8, 8, 8), 4, channel=2)  # j 8..11: half inside (0.5)
    _cube(probabilities, (14, 9, 14), 4, channel=1)  # j 9..12: a quarter inside
    probabilities[:, 18, 13, 18] = (0.05, 0.2, 0.75)  # another class, diagonal to the last cube: the same piece
    before = probabilities.copy()
    drop_pieces_outside_brain(probabilities, brain, 0.5, background=0)
    labels = probabilities.argmax(0)
    assert labels[2:6, 6:10, 2:6].min() == 1 and labels[8:12, 8:12, 8:12].min() == 2  # kept: fraction >= 0.5
    assert labels[12:, :, 12:].max() == 0  # the quarter-inside piece is gone, inside part and diagonal voxel too
    kept = labels[:12] > 0
    np.testing.assert_array_equal(probabilities[:, :12], before[:, :12])  # the rest untouched
    assert kept.sum() == 2 * 4 ** 3
    np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-6)
    drop_pieces_outside_brain(probabilities, brain, 0.51, background=0)  # a stricter rule drops the half piece
    assert probabilities.argmax(0).sum() == 4 ** 3


def _with_postprocessing(card_path, postprocessing):
    data = json.loads(card_path.read_text())
    card_path.write_text(json.dumps(data | {"postprocessing": postprocessing}))
    return card_path


def test_segment_applies_the_cards_brain_margin(tiny_card):
    scan, radius = ball_head(shape=(40, 40, 40))
    plain = segment(scan, load_model(tiny_card), device="cpu")
    kept = segment(scan, load_model(_with_postprocessing(tiny_card, {"brain_margin_mm": 4})), device="cpu")
    far = radius > RADIUS_MM + 4 + 2 * SPACING_MM
    assert np.any(plain.labels.array[far] > 0)  # the random network finds "lesions" outside the brain ...
    assert np.all(kept.labels.array[far] == 0)  # ... which the card's postprocessing removes
    near = radius < RADIUS_MM - 2 * SPACING_MM
    assert np.array_equal(kept.labels.array[near], plain.labels.array[near])
    assert "postprocess" in kept.timings and "postprocess" not in plain.timings


def test_segment_drops_the_pieces_outside_the_brain(tiny_card):
    scan, radius = ball_head(shape=(40, 40, 40))
    plain = segment(scan, load_model(tiny_card), device="cpu")
    pieces, n = ndimage.label(plain.labels.array > 0, structure=np.ones((3, 3, 3)))
    assert n == 1  # the random network's "lesion" is one piece spilling out of the brain:
    in_brain = float(np.mean(radius[pieces == 1] < RADIUS_MM))
    assert 0.1 < in_brain < 0.4
    for fraction, kept_as_is in ((in_brain + 0.1, False), (in_brain - 0.1, True)):
        card = _with_postprocessing(tiny_card, {"min_fraction_in_brain": round(fraction, 2)})
        labels = segment(scan, load_model(card), device="cpu").labels.array
        assert np.array_equal(labels, plain.labels.array) if kept_as_is else not labels.any()


@pytest.mark.parametrize("postprocessing, message", [
    ({"brain_margin_mm": -1}, "brain_margin_mm must be a number of mm >= 0"),
    ({"brain_margin_mm": "ten"}, "brain_margin_mm must be a number of mm >= 0"),
    ({"min_fraction_in_brain": 0}, "min_fraction_in_brain must be a number in (0, 1]"),
    ({"min_fraction_in_brain": 1.5}, "min_fraction_in_brain must be a number in (0, 1]"),
    ({"skull_strip": True}, "unknown postprocessing"),
])
def test_a_bad_postprocessing_entry_is_one_error_line_and_exit_2(tiny_card, tmp_path, capsys, postprocessing, message):
    scan, _ = ball_head(shape=(24, 24, 24))
    path = write_volume(scan, tmp_path / "scan.nii.gz")
    out = tmp_path / "out"
    assert main(["segment", str(path), "--model", str(_with_postprocessing(tiny_card, postprocessing)),
                 "--out", str(out), "--progress", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not out.exists()


def test_the_card_round_trips_its_postprocessing(tiny_card):
    card = ModelCard.load(_with_postprocessing(tiny_card, {"brain_margin_mm": 10}))
    assert card.postprocessing == {"brain_margin_mm": 10}
    assert ModelCard.from_dict(card.to_dict(), root=card.root).postprocessing == {"brain_margin_mm": 10}
    assert "postprocessing" not in ModelCard.load(_with_postprocessing(tiny_card, {})).to_dict()
