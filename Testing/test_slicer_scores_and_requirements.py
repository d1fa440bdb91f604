"""Case-level scores in words and the review advice; the module's declared Python requirements."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("slicer")  # SegXAILogic's package imports slicer

from packaging.requirements import Requirement  # noqa: E402

from SegXAILib.quality import review_case  # noqa: E402
from SegXAILogic.requirements import SLICER_PROVIDED, missingRequirements, readRequirements  # noqa: E402
from SegXAILogic.scores import caseScores, reviewAdvice, reviewVerdict  # noqa: E402

CLASSES = [{"name": n, "label": v} for n, v in (("background", 0), ("necrotic core", 1), ("edema", 2), ("rim", 4))]


def summary(**scores) -> dict:
    """A summary as written before ``review`` existed: the panel judges it with the default thresholds."""
    return {"classes": CLASSES, "target": {"name": "whole tumour"}, "scores": scores}


def test_good_scores_give_no_advice():
    case = summary(object_volume_ml=12.5, **{"protoseg.mean_sa": 0.83, "tta.entropy_inside": 0.2,
                                             "tta.variance_inside": 0.01, "misure.reliability": 0.9})
    by_key = {s.key: s for s in caseScores(case)}
    assert list(by_key) == list(case["scores"])
    assert not any(s.poor for s in by_key.values()) and reviewAdvice(case) is None
    # entropy judged against half its maximum, log(4 classes) = 1.386 nats
    assert by_key["tta.entropy_inside"].text == "0.2 (review if > 0.693)"
    assert by_key["protoseg.mean_sa"].label == "Segmentation ability of the last layers (mean SA \u03bc) (ProtoSeg)"
    assert by_key["object_volume_ml"].value == 12.5


@pytest.mark.parametrize("key, value, reason", [
    ("protoseg.mean_sa", 0.41, "barely separate the whole tumour from the rest"),
    ("tta.entropy_inside", 0.8, "unsure inside the whole tumour (Uncertainty inside the object (entropy, nats) "
                                "(test-time augmentation) = 0.8"),
    ("mcdropout.entropy_inside", 0.8, "(Monte Carlo dropout) = 0.8; review if > 0.693"),
    ("misure.reliability", 0.3, "more likely wrong than right (Reliability (probability) (MiSuRe) = 0.3"),
    ("object_volume_ml", 0.0, "the model segmented almost nothing as whole tumour"),
])
def test_each_poor_score_asks_for_review(key, value, reason):
    case = summary(object_volume_ml=10.0, **{"protoseg.mean_sa": 0.9})
    case["scores"][key] = value
    assert [s.key for s in caseScores(case) if s.poor] == [key]
    advice = reviewAdvice(case)
    assert advice is not None and advice.startswith("Review this case: ") and advice.endswith(".")
    assert reason in advice and advice.count(";") == 1  # one reason: "<what>; <threshold>" only


def test_the_panel_shows_the_verdict_the_run_wrote():
    case = summary(**{"protoseg.mean_sa": 0.12, "tta.entropy_inside": 0.3})
    assert [s.poor for s in caseScores(case)] == [True, False]  # an older summary: the default 0.5 flags it
    basis = "5th percentile of mean SA on 24 validation cases"
    case["review"] = review_case(case, {"mean_sa_below": 0.05, "basis": basis})  # as the explain run writes it
    scores = caseScores(case)
    assert [s.poor for s in scores] == [False, False] and reviewAdvice(case) is None
    assert scores[0].text == f"0.12 (review if < 0.05, calibrated: {basis})"
    case["scores"]["protoseg.mean_sa"] = 0.01  # the panel shows what the run wrote, it does not judge again
    assert reviewAdvice(case) is None
    case["review"] = review_case(case, {"mean_sa_below": 0.05, "basis": basis})
    advice = reviewAdvice(case)
    assert "barely separate the whole tumour" in advice and "(ProtoSeg) = 0.01; review if < 0.05, calibrated" in advice


def test_the_verdict_is_amber_and_names_what_is_missing_until_every_check_ran():
    gradcam_only = summary(object_volume_ml=12.5)
    text, level = reviewVerdict(gradcam_only)
    assert level == "incomplete" and "no all-clear" in text and "add protoseg" in text
    everything = summary(object_volume_ml=12.5, **{"protoseg.mean_sa": 0.83, "tta.entropy_inside": 0.2,
                                                   "misure.reliability": 0.9})
    assert reviewVerdict(everything)[1] == "ok"
    everything["scores"]["protoseg.mean_sa"] = 0.01
    text, level = reviewVerdict(everything)
    assert level == "review" and text.startswith("Review this case: ")
    older = summary(object_volume_ml=12.5)
    older["review"] = {"needed": False, "reasons": [], "scores": []}  # written before the checks existed
    assert reviewVerdict(older)[1] == "incomplete"


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
