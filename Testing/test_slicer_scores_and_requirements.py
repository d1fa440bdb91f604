"""Case-level scores in words and the review advice; the module's declared Python requirements."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("slicer")  # SegXAILogic's package imports slicer

from packaging.requirements import Requirement  # noqa: E402

from SegXAILogic.requirements import SLICER_PROVIDED, missingRequirements, readRequirements  # noqa: E402
from SegXAILogic.scores import caseScores, reviewAdvice  # noqa: E402

CLASSES = [{"name": n, "label": v} for n, v in (("background", 0), ("necrotic core", 1), ("edema", 2), ("rim", 4))]


def summary(**scores) -> dict:
    return {"classes": CLASSES, "target": {"name": "whole tumour"}, "scores": scores}


def test_good_scores_give_no_advice():
    scores = caseScores(summary(object_volume_ml=12.5, **{"protoseg.mean_sa": 0.83, "tta.entropy_inside": 0.2,
                                                           "tta.variance_inside": 0.01, "misure.reliability": 0.9}))
    by_key = {s.key: s for s in scores}
    assert set(by_key) == {"object_volume_ml", "protoseg.mean_sa", "tta.entropy_inside", "misure.reliability"}
    assert not any(s.poor for s in scores) and reviewAdvice(scores) is None
    # entropy as a share of its maximum log(4 classes)
    assert by_key["tta.entropy_inside"].value == pytest.approx(0.2 / math.log(4))
    assert by_key["tta.entropy_inside"].text == "14% of the maximum"
    assert by_key["object_volume_ml"].label == "Volume of whole tumour"


@pytest.mark.parametrize("key, value, reason", [
    ("protoseg.mean_sa", 0.41, "features barely separate the object (mean SA 0.41)"),
    ("tta.entropy_inside", 0.8, "uncertain inside the object (58% of the maximum)"),
    ("mcdropout.entropy_inside", 0.8, "uncertain inside the object"),
    ("misure.reliability", 0.3, "low reliability (30% chance of Dice >= 0.9)"),
    ("object_volume_ml", 0.0, "the model found no object"),
])
def test_each_poor_score_asks_for_review(key, value, reason):
    scores = summary(object_volume_ml=10.0, **{"protoseg.mean_sa": 0.9})
    scores["scores"][key] = value
    advice = reviewAdvice(caseScores(scores))
    assert advice is not None and advice.startswith("Review this case: ") and reason in advice


def test_thresholds_are_strict_at_the_boundary():
    at = caseScores(summary(**{"protoseg.mean_sa": 0.5, "tta.entropy_inside": 0.5 * math.log(4)}))
    assert not any(s.poor for s in at)
    below = caseScores(summary(**{"protoseg.mean_sa": 0.4999, "tta.entropy_inside": 0.5001 * math.log(4)}))
    assert all(s.poor for s in below)


def test_requirements_follow_pyproject_except_what_slicer_provides():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    declared = {Requirement(r).name.lower(): str(Requirement(r).specifier) for r in readRequirements()}
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text(encoding="utf-8"))
    dependencies = {Requirement(d).name.lower(): str(Requirement(d).specifier)
                    for d in project["project"]["dependencies"]}
    provided = {name.lower() for name in SLICER_PROVIDED}
    assert not provided & set(declared)  # torch, vtk, SimpleITK are never pip-installed into Slicer
    assert declared == {k: v for k, v in dependencies.items() if k not in provided}


def test_missing_requirements():
    assert missingRequirements(["numpy>=1.0", "numpy<1.0", "surely-not-a-package-segxai>=1"]) == \
        ["numpy<1.0", "surely-not-a-package-segxai>=1"]
