"""The "review this case" verdict: default thresholds, a model card's calibrated ones, and summary.json."""

from __future__ import annotations

import html
import json
import math
import re

import pytest

from SegXAILib.cli import main
from SegXAILib.errors import SegXAIError
from SegXAILib.image_quality import image_quality
from SegXAILib.models.card import ModelCard
from SegXAILib.quality import DEFAULT_BASIS, reliability_judges, review_case
from SegXAILib.volume import read_volume

from .conftest import make_card

CALIBRATED = {"mean_sa_below": 0.05, "basis": "5th percentile of mean SA on 24 validation cases (Dice >= 0.7)"}


def summary_with(scores: dict, n_classes: int = 3) -> dict:
    return {"target": {"name": "blob", "labels": [1]}, "scores": scores,
            "classes": [{"name": f"c{n}", "label": n} for n in range(n_classes)], "maps": []}


def flagged(summary: dict, card_review: dict | None = None) -> set[str]:
    return {s["key"] for s in review_case(summary, card_review)["scores"] if s["review"]}


# the default limits written out here, not read from the module: a changed default must fail a test
@pytest.mark.parametrize("key, limit, side, of_max_entropy", [
    ("object_volume_ml", 0.1, "below", False),
    ("protoseg.mean_sa", 0.5, "below", False),
    ("tta.entropy_inside", 0.5, "above", True),
    ("mcdropout.variance_inside", 0.05, "above", False),
    ("ensemble.mutual_information_inside", 0.2, "above", True),
    ("misure.reliability", 0.5, "below", False),
    ("misure.dice_reliability", 0.5, "below", False),  # any name containing "reliability"
])
@pytest.mark.parametrize("n_classes", [3, 4])
def test_default_thresholds_flag_only_past_the_limit(key, limit, side, of_max_entropy, n_classes):
    threshold = limit * math.log(n_classes) if of_max_entropy else limit
    worse, better = (threshold * 0.98, threshold * 1.02) if side == "below" else (threshold * 1.02, threshold * 0.98)
    for value, expected in ((worse, True), (better, False), (threshold, False)):  # strict at the limit itself
        review = review_case(summary_with({key: value}, n_classes))
        assert review["needed"] is expected and review["scores"][0]["review"] is expected, value
        assert len(review["reasons"]) == int(expected)
    name = key.rpartition(".")[2]
    used = review_case(summary_with({key: 0.0}, n_classes))["thresholds"]
    rule = "reliability" if "reliability" in name else name
    assert used[rule]["threshold"] == pytest.approx(threshold) and used[rule]["review"] == side
    assert used[rule]["basis"] == DEFAULT_BASIS


@pytest.mark.parametrize("auc_cv, judged", [(0.8, True), (0.75, True), (0.7, False), (None, False)])
def test_a_reliability_classifier_judges_only_with_a_cross_validated_auroc_of_075(auc_cv, judged):
    summary = summary_with({"reliability": 0.1})
    summary["reliability_model"] = {"file": "m.reliability.json", "cases": 25, "auc_train": 0.94, "auc_cv": auc_cv}
    review = review_case(summary)
    assert reliability_judges(summary) is judged and review["needed"] is judged
    assert review["scores"][0]["value"] == 0.1  # shown either way
    assert ("not used for review" in review["scores"][0]["rule"]) is not judged
    if auc_cv == 0.7:
        assert "AUROC is 0.70, below 0.75" in review["scores"][0]["rule"]


def test_entropy_limits_scale_with_the_number_of_classes():
    # 0.6 nats: 0.55 of log(3) (flagged), 0.43 of log(4) (not): the limit is a share of the maximum, not nats
    assert flagged(summary_with({"tta.entropy_inside": 0.6}, 3)) == {"tta.entropy_inside"}
    assert flagged(summary_with({"tta.entropy_inside": 0.6}, 4)) == set()
    assert review_case(summary_with({"tta.entropy_inside": 0.6}, 4))["thresholds"]["entropy_inside"][
        "fraction_of_max_entropy"] == 0.5


def test_scores_without_a_rule_or_a_number_are_shown_but_never_flagged():
    summary = summary_with({"mhex-uncertainty.uncertainty_inside": 99.0, "protoseg.mean_sa": float("nan"),
                            "tta.entropy_inside": None})
    review = review_case(summary)
    assert [s["key"] for s in review["scores"]] == list(summary["scores"])
    assert not review["needed"] and review["reasons"] == []
    assert set(review["thresholds"]) == {"mean_sa", "entropy_inside"}  # only rules that judged a score
    assert review["scores"][0]["rule"] == ""
    assert review["scores"][0]["meaning"] == "Reported by collaboration-gradient uncertainty."


def test_reasons_name_each_flagged_score():
    summary = summary_with({"object_volume_ml": 0.02, "protoseg.mean_sa": 0.31, "tta.entropy_inside": 0.1,
                            "tta.variance_inside": 0.09})
    review = review_case(summary)
    assert review["needed"] and flagged(summary) == {"object_volume_ml", "protoseg.mean_sa", "tta.variance_inside"}
    volume, sa, variance = review["reasons"]
    assert volume.startswith("the model segmented almost nothing as blob") and "= 0.02; review if < 0.1" in volume
    assert "barely separate the blob" in sa and "(ProtoSeg) = 0.31; review if < 0.5" in sa
    assert "disagree about the blob" in variance and "(test-time augmentation) = 0.09; review if > 0.05" in variance


def test_a_card_calibration_changes_the_verdict_and_reports_its_basis():
    summary = summary_with({"protoseg.mean_sa": 0.12, "tta.entropy_inside": 0.9})  # 0.82 of log(3): flagged
    default = review_case(summary)
    assert flagged(summary) == {"protoseg.mean_sa", "tta.entropy_inside"}
    assert default["thresholds"]["mean_sa"] == {"review": "below", "threshold": 0.5, "basis": DEFAULT_BASIS}

    calibrated = review_case(summary, CALIBRATED)
    assert flagged(summary, CALIBRATED) == {"tta.entropy_inside"}  # mean SA 0.12 is fine for this model
    assert calibrated["thresholds"]["mean_sa"] == {"review": "below", "threshold": 0.05, "basis": CALIBRATED["basis"]}
    assert calibrated["thresholds"]["entropy_inside"]["basis"] == DEFAULT_BASIS  # not named by the card
    assert calibrated["scores"][0]["rule"] == f"review if < 0.05, calibrated: {CALIBRATED['basis']}"
    assert flagged(summary_with({"protoseg.mean_sa": 0.04}), CALIBRATED) == {"protoseg.mean_sa"}
    # an entropy limit in the card is a share of log(number of classes), like the default
    lenient = {"entropy_inside_above": 0.9, "basis": "test"}
    assert flagged(summary, lenient) == {"protoseg.mean_sa"}
    used = review_case(summary, lenient)["thresholds"]["entropy_inside"]
    assert used["threshold"] == pytest.approx(0.9 * math.log(3)) and used["basis"] == "test"


def card_dict(**extra) -> dict:
    return {"name": "c", "architecture": {"name": "unet"}, "patch_size": [8, 8, 8],
            "classes": [{"name": "background", "label": 0}, {"name": "blob", "label": 1}], **extra}


def test_card_review_round_trips_through_json(tmp_path):
    card = ModelCard.from_dict(card_dict(review=CALIBRATED), root=tmp_path)
    again = ModelCard.load(card.save(tmp_path / "card.json"))
    assert again.review == CALIBRATED and again.to_dict() == card.to_dict()
    assert json.loads((tmp_path / "card.json").read_text(encoding="utf-8"))["review"] == CALIBRATED
    assert "review" not in ModelCard.from_dict(card_dict()).to_dict()  # cards without one stay as they were


@pytest.mark.parametrize("review, words", [
    ({"mean_sa_above": 0.3, "basis": "b"}, "'mean_sa_above' names no review threshold"),  # the wrong side
    ({"dice_below": 0.3, "basis": "b"}, "'dice_below' names no review threshold"),
    ({"mean_sa_below": "low", "basis": "b"}, "must be a number"),
    ({"mean_sa_below": 0.05}, "need a 'basis'"),
])
def test_a_bad_card_review_is_refused_when_the_card_is_read(review, words):
    with pytest.raises(SegXAIError, match=words):
        ModelCard.from_dict(card_dict(review=review))


def test_explain_writes_the_cards_verdict_into_the_summary_and_the_report(tmp_path, scan_file):
    path = make_card(tmp_path)
    card = ModelCard.load(path)
    card.review = {"mean_sa_below": 1.01, "basis": "test: every mean SA is below 1.01"}
    card.save(path)
    out = tmp_path / "out"
    assert main(["explain", str(scan_file), "--model", str(path), "--methods", "protoseg", "--out", str(out),
                 "--device", "cpu", "--progress", "none"]) == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    review = summary.pop("review")
    assert review == review_case(summary, card.review)
    assert review["needed"] and "protoseg.mean_sa" in flagged(summary, card.review)
    assert review["thresholds"]["mean_sa"]["basis"] == card.review["basis"]
    assert [s["key"] for s in review["scores"]] == list(summary["scores"])
    # the scan's own acquisition scores, measured on the input scan: never flagged for one case alone
    written = read_volume(scan_file)
    measured = image_quality(written.array, written.spacing)
    for name, value in measured.items():  # undefined (NaN) is written as JSON null
        assert summary["scores"][f"image.{name}"] == (None if math.isnan(value) else pytest.approx(value))
    assert summary["scores"]["image.noise"] > 0
    assert not any(s["review"] for s in review["scores"] if s["key"].startswith("image."))
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "Review this case" in page and "calibrated: test: every mean SA is below 1.01" in page
    assert "Scan noise (1/SNR)" in page and "measured on the scan itself" in page


# ------------------------------------------------------------------ the checks a verdict rests on
ALL_CHECKS = ["size of the segmented object", "segmentation ability", "uncertainty inside the object", "reliability"]


def checks_made(review: dict) -> list[str]:
    return [c["check"] for c in review["checks"] if c["made"]]


def test_a_verdict_without_a_problem_names_the_checks_that_did_not_run():
    gradcam_only = summary_with({"object_volume_ml": 12.0, "image.noise": 0.03})  # the scores of --methods gradcam
    review = review_case(gradcam_only)
    assert not review["needed"] and review["complete"] is False
    assert [c["check"] for c in review["checks"]] == ALL_CHECKS and checks_made(review) == ALL_CHECKS[:1]
    how = {c["check"]: c.get("how") for c in review["checks"]}
    assert how["segmentation ability"] == "add protoseg to --methods"
    assert how["uncertainty inside the object"] == "add mcdropout, tta or ensemble to --methods"
    assert "reliability model" in how["reliability"] and "segxai train-reliability" in how["reliability"]
    assert review["verdict"].startswith("No problem found by the 1 check that ran (size of the segmented object); "
                                        "3 checks not run, so this is no all-clear. Not checked: segmentation "
                                        "ability (add protoseg to --methods); ")

    # every check made: an all-clear (that still does not prove the outline right)
    full = summary_with({"object_volume_ml": 12.0, "protoseg.mean_sa": 0.7, "tta.entropy_inside": 0.1,
                         "reliability": 0.95})
    review = review_case(full)
    assert review["complete"] and checks_made(review) == ALL_CHECKS and "how" not in review["checks"][3]
    assert review["checks"][2]["scores"] == ["tta.entropy_inside"]
    assert review["verdict"].startswith("No problem found by the 4 checks (size of the segmented object, ")


@pytest.mark.parametrize("scores, extra, check, how", [
    # the reliability model needs methods the run left out: its recorded reason says which
    ({}, {"not_applicable": {"reliability": "the reliability model of m needs misure; explain with misure"}},
     "reliability", "the reliability model of m needs misure; explain with misure"),
    # a classifier too weak to judge: its probability is shown but checks nothing
    ({"reliability": 0.9}, {"reliability_model": {"auc_cv": 0.6}}, "reliability",
     "not used for review: the classifier's cross-validated AUROC is 0.60, below 0.75"),
    # a method ran but its score is not a number
    ({"tta.entropy_inside": float("nan")}, {}, "uncertainty inside the object",
     "its score was not a number (nothing segmented?)"),
])
def test_a_check_not_made_says_why(scores, extra, check, how):
    summary = summary_with({"object_volume_ml": 12.0, "protoseg.mean_sa": 0.7, "tta.entropy_inside": 0.1,
                            "reliability": 0.95} | scores) | extra
    if "not_applicable" in extra:
        del summary["scores"]["reliability"]
    review = review_case(summary)
    assert [c["check"] for c in review["checks"] if not c["made"]] == [check]
    assert next(c["how"] for c in review["checks"] if c["check"] == check) == how
    assert not review["complete"] and f"Not checked: {check} ({how})." in review["verdict"]


def test_a_flagged_case_also_names_the_checks_that_did_not_run():
    review = review_case(summary_with({"object_volume_ml": 0.02}))
    assert review["needed"] and not review["complete"]
    assert review["verdict"].startswith("Review this case: the model segmented almost nothing as blob "
                                        "(Volume of the segmented object (mL) = 0.02; review if < 0.1). Not checked: ")


def test_a_gradcam_only_run_is_no_all_clear_in_the_summary_or_the_report(tmp_path, scan_file):
    """The run of issue 23: Grad-CAM alone, no score past its threshold, and most checks not made."""
    out = tmp_path / "out"
    assert main(["explain", str(scan_file), "--model", str(make_card(tmp_path)), "--methods", "gradcam",
                 "--out", str(out), "--device", "cpu", "--progress", "none"]) == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    review = summary["review"]
    if review["needed"]:  # a random network may segment almost nothing; the checks are the point here
        assert [s["key"] for s in review["scores"] if s["review"]] == ["object_volume_ml"]
    assert checks_made(review) == ["size of the segmented object"] and not review["complete"]
    page = (out / "report.html").read_text(encoding="utf-8")
    box = re.search(r"<p class=\"verdict (\w+)\">", page).group(1)
    assert box == ("review" if review["needed"] else "incomplete")  # never the green all-clear
    assert "verdict ok" not in page
    for check in review["checks"][1:]:
        assert f"<li><b>{check['check']}</b>: {html.escape(check['how'])}</li>" in page
