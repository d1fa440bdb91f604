"""Post-hoc reliability: features of a summary, the NumPy model against scikit-learn, storage, the pipeline."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from SegXAILib.cli import main
from SegXAILib.errors import SegXAIError
from SegXAILib.models.card import ModelCard
from SegXAILib.reliability import ReliabilityModel, case_features, fit_reliability, reliability_path
from SegXAILib.volume import read_volume, write_volume

from .conftest import oblique_scan

NAMES = ("misure.dice_explained", "misure.perturbation_ratio", "protoseg.mean_sa")


def dataset(n=40, seed=0):
    """Features (as dicts and as an (n, 3) array) and Dice values that a logistic model explains in part."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)) * [0.1, 5.0, 0.2] + [0.8, 10.0, 0.3]
    logit = 8 * (x[:, 0] - 0.8) - 0.1 * (x[:, 1] - 10) + rng.normal(scale=0.8, size=n)
    dice = np.where(logit > 0, 0.95, 0.6)
    return [dict(zip(NAMES, row)) for row in x], x, dice


def test_case_features_read_misure_scalars_scores_and_volume():
    summary = {"explanations": [{"method": "misure", "scalars": {"dilations": 2.0, "dice_explained": 0.8,
                                                                 "perturbation_ratio": 3.5, "dice_sufficient": 0.9}},
                                {"method": "protoseg", "scalars": {"mean_sa": 0.4}}],
               "scores": {"object_volume_ml": 12.0, "protoseg.mean_sa": 0.4, "tta.entropy_inside": float("nan"),
                          "mcdropout.entropy_inside": 0.2, "tta.variance_inside": 0.01}}
    assert case_features(summary) == {"misure.dilations": 2.0, "misure.dice_explained": 0.8,
                                      "misure.perturbation_ratio": 3.5, "protoseg.mean_sa": 0.4,
                                      "mcdropout.entropy_inside": 0.2, "log_object_volume_ml": math.log(13.0)}


def test_numpy_apply_equals_sklearn_predict_proba():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cases, x, dice = dataset()
    model = fit_reliability(cases, dice, "tiny", "lesion")
    reference = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x, dice >= 0.9)
    expected = reference.predict_proba(x)[:, 1]
    assert model.features == NAMES
    np.testing.assert_allclose(model.predict_proba(model.matrix(cases)), expected, rtol=0, atol=1e-12)
    assert model.probability(cases[3]) == pytest.approx(expected[3], abs=1e-12)
    assert 0.5 < model.training["auc_cv"] <= 1 and model.training["folds"] == 5
    assert model.training["cases"] == 40 and model.training["positives"] == int((dice >= 0.9).sum())


def test_json_round_trip_applies_without_sklearn(tmp_path):
    cases, x, dice = dataset()
    model = fit_reliability(cases, dice, "tiny", "lesion", methods="misure,protoseg")
    path = model.save(tmp_path / "tiny.reliability.json")
    data = json.loads(path.read_text(encoding="utf-8"))  # plain JSON, no pickle
    assert data["kind"] == "segxai-reliability" and data["features"] == list(NAMES)
    assert set(data) >= {"mean", "scale", "coef", "intercept", "training", "target", "model"}
    loaded = ReliabilityModel.load(path)
    assert loaded.features == model.features and loaded.training == model.training
    np.testing.assert_array_equal(loaded.predict_proba(x), model.predict_proba(x))
    # applying is NumPy only: the module never imports scikit-learn for it
    code = ("import sys; from SegXAILib.reliability import ReliabilityModel; "
            f"m = ReliabilityModel.load({str(path)!r}); m.predict_proba(m.mean[None]); "
            "assert not any(k.startswith('sklearn') for k in sys.modules)")
    import subprocess
    import sys

    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_separable_dataset_gives_auc_1():
    rng = np.random.default_rng(1)
    good = rng.uniform(0.85, 1.0, 12)
    poor = rng.uniform(0.2, 0.6, 12)
    cases = [{"misure.dice_explained": v, "protoseg.mean_sa": rng.uniform()} for v in np.r_[good, poor]]
    model = fit_reliability(cases, [0.95] * 12 + [0.5] * 12, "tiny", "lesion")
    assert model.training["auc_train"] == 1.0 and model.training["auc_cv"] == 1.0
    assert model.training["accuracy_cv"] > 0.9


def test_missing_feature_one_class_and_bad_files_are_clear_errors(tmp_path):
    cases, _, dice = dataset()
    model = fit_reliability(cases, dice, "tiny", "lesion")
    with pytest.raises(SegXAIError, match="needs misure.perturbation_ratio; explain with the method.s. misure"):
        model.probability({"misure.dice_explained": 0.8, "protoseg.mean_sa": 0.3})
    # trained on the features every case has
    fewer = [dict(c) for c in cases]
    del fewer[5]["protoseg.mean_sa"]
    assert fit_reliability(fewer, dice, "tiny", "lesion").features == NAMES[:2]
    with pytest.raises(SegXAIError, match="good and poor"):
        fit_reliability(cases, [0.95] * len(cases), "tiny", "lesion")
    (tmp_path / "x.json").write_text(json.dumps({"name": "a model card"}))
    with pytest.raises(SegXAIError, match="not a SegXAI reliability model"):
        ReliabilityModel.load(tmp_path / "x.json")


def test_a_case_far_from_the_training_cases_gets_no_probability():
    cases, _, dice = dataset()
    model = fit_reliability(cases, dice, "tiny", "lesion")
    i = model.features.index("misure.dice_explained")
    inside = dict(cases[0], **{"misure.dice_explained": model.mean[i] + 4.9 * model.scale[i]})
    assert 0 <= model.probability(inside) <= 1
    outside = dict(cases[0], **{"misure.dice_explained": model.mean[i] - 5.1 * model.scale[i]})
    with pytest.raises(SegXAIError, match=r"MiSuRe.s dice explained .* lies 5.1 standard deviations .* fit it again"):
        model.probability(outside)


def explain(tmp_path, card, scan, out, methods="protoseg", *extra):
    assert main(["explain", str(scan), "--model", str(card), "--methods", methods, "--out", str(tmp_path / out),
                 "--no-report", "--progress", "none", *extra]) == 0
    return json.loads((tmp_path / out / "summary.json").read_text(encoding="utf-8"))


def test_pipeline_adds_reliability_when_the_file_lies_beside_the_card(tmp_path, tiny_card, scan_file):
    before = explain(tmp_path, tiny_card, scan_file, "before")
    assert "reliability" not in before["scores"]
    features = ("protoseg.mean_sa", "log_object_volume_ml")
    model = ReliabilityModel(features, np.array([0.5, 3.0]), np.array([0.1, 1.0]), np.array([2.0, -0.5]), -3.0,
                             "tiny", "lesion", training={"cases": 10, "auc_train": 0.9, "auc_cv": 0.8})
    path = model.save(reliability_path(ModelCard.load(tiny_card)))
    assert path == tiny_card.parent / "tiny.reliability.json"

    summary = explain(tmp_path, tiny_card, scan_file, "after")
    expected = model.probability(case_features(summary))
    assert 0.05 < expected < 0.5  # the numbers above: about 0.25 on the tiny model's segmentation
    assert summary["scores"]["reliability"] == pytest.approx(expected)
    assert summary["reliability_model"]["features"] == list(features)
    row = next(s for s in summary["review"]["scores"] if s["key"] == "reliability")  # judged by quality.py's rule
    assert row["review"] and any("more likely wrong than right" in r for r in summary["review"]["reasons"])

    without = explain(tmp_path, tiny_card, scan_file, "gradcam", "gradcam")
    assert "reliability" not in without["scores"] and "protoseg" in without["not_applicable"]["reliability"]
    other = explain(tmp_path, tiny_card, scan_file, "core", "protoseg", "--target", "core")
    assert "reliability" not in other["scores"] and "'lesion'" in other["not_applicable"]["reliability"]


def test_train_reliability_command_writes_the_file_beside_the_card(tmp_path, tiny_card, capsys):
    """Cases labelled with the model's own segmentation (Dice 1) and with a blob (Dice < 0.9)."""
    cases = tmp_path / "cases"
    for n in range(4):
        folder = cases / f"case{n}"
        scan = write_volume(oblique_scan(shape=(14, 16, 18), seed=n), folder / "image.nii.gz")
        if n % 2:
            assert main(["segment", str(scan), "--model", str(tiny_card), "--out", str(tmp_path / f"seg{n}"),
                         "--progress", "none"]) == 0
            label = read_volume(tmp_path / f"seg{n}" / "segmentation.nii.gz")
        else:
            image = read_volume(scan)
            label = image.with_array((image.array > 60).astype(np.uint8))
        write_volume(label, folder / "label.nii.gz")
    assert main(["train-reliability", str(cases), "--model", str(tiny_card), "--methods", "protoseg",
                 "--work", str(tmp_path / "work"), "--progress", "none"]) == 0
    model = ReliabilityModel.load(tiny_card.parent / "tiny.reliability.json")
    assert model.training["cases"] == 4 and model.training["positives"] == 2 and model.training["folds"] == 2
    assert model.features == ("protoseg.mean_sa", "log_object_volume_ml") and model.target == "lesion"
    assert (tmp_path / "work" / "audit.csv").is_file()
    assert "cross-validated (2-fold) AUC" in capsys.readouterr().out
    assert "reliability" in explain(tmp_path, tiny_card, cases / "case0" / "image.nii.gz", "applied")["scores"]
