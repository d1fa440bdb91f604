"""`segxai train` end to end on tiny cases, and the calibration of the card's review thresholds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from SegXAILib.cli import main
from SegXAILib.models.card import ModelCard
from SegXAILib.models.registry import load_model
from SegXAILib.training import GOOD_CASE_DICE, review_calibration
from SegXAILib.volume import Volume, write_volume

CLASSES = [{"name": "background", "label": 0}, {"name": "core", "label": 1}, {"name": "rim", "label": 4}]


def write_blob_case(folder, seed: int) -> None:
    """A bright ball (core, label 1) in a darker shell (rim, label 4), in noise; 24^3 at 2 mm."""
    rng = np.random.default_rng(seed)
    centre = rng.uniform(9, 15, 3)
    k, j, i = np.indices((24, 24, 24))
    distance = np.sqrt((k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2)
    label = np.where(distance < 3, 1, np.where(distance < 5, 4, 0)).astype(np.uint8)
    image = (100 + 80 * (label == 1) + 40 * (label == 4) + 5 * rng.standard_normal(label.shape)).astype(np.float32)
    write_volume(Volume(image, spacing=(2.0, 2.0, 2.0)), folder / "image.nii.gz")
    write_volume(Volume(label, spacing=(2.0, 2.0, 2.0)), folder / "label.nii.gz")


@pytest.mark.slow
def test_train_writes_a_loadable_card_with_validation_dice(tmp_path):
    for split, seeds in (("train", range(4)), ("val", range(100, 102))):
        for seed in seeds:
            (tmp_path / split / f"case-{seed}").mkdir(parents=True)
            write_blob_case(tmp_path / split / f"case-{seed}", seed)
    config = {
        "name": "blob", "architecture": {"name": "unet", "args": {"channels": [4, 8], "strides": [2]}},
        "classes": CLASSES, "groups": {"lesion": [1, 4]}, "default_target": "lesion",
        "preprocessing": {"orientation": "RAS", "spacing": [2.0, 2.0, 2.0], "intensity": {"kind": "zscore_foreground"}},
        "patch_size": [16, 16, 16], "train_patch": [16, 16, 16], "train_dir": str(tmp_path / "train"),
        "val_dir": str(tmp_path / "val"), "out": str(tmp_path / "model" / "blob.json"), "iterations": 6,
        "validate_every": 3, "threads": 1, "command": "test"}
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    threads = torch.get_num_threads()
    assert main(["train", "--config", str(tmp_path / "config.json"), "--progress", "none"]) == 0
    torch.set_num_threads(threads)

    card = ModelCard.load(tmp_path / "model" / "blob.json")
    assert set(card.validation["dice"]) == {"core", "rim", "lesion"}
    assert all(0.0 <= d <= 1.0 for d in card.validation["dice"].values())
    assert card.validation["cases"] == 2
    assert [h["iteration"] for h in card.validation["training"]["history"]["0"]] == [3, 6]
    assert card.review == {}  # two validation cases are too few to calibrate
    assert load_model(str(tmp_path / "model" / "blob.json")).network(torch.zeros(1, 1, 16, 16, 16)).shape == \
        (1, 3, 16, 16, 16)
    # the cached model-grid arrays live beside each case
    assert len(list((tmp_path / "train" / "case-0").glob(".model-grid-*.npy"))) == 1

    # --evaluate-only: the same weights give the same figures; the card keeps the recorded run, or says
    # that none is known
    weights = (tmp_path / "model" / "blob.safetensors").read_bytes()
    for card_kept in (True, False):
        if not card_kept:
            (tmp_path / "model" / "blob.json").unlink()
        assert main(["train", "--config", str(tmp_path / "config.json"), "--evaluate-only", "--progress", "none"]) == 0
        torch.set_num_threads(threads)
        again = ModelCard.load(tmp_path / "model" / "blob.json")
        assert again.validation["dice"] == card.validation["dice"]
        assert "evaluate-only" in again.validation["training"]["note"]
        assert again.validation["training"].get("history") == (card.validation["training"]["history"] if card_kept
                                                               else None)
    assert (tmp_path / "model" / "blob.safetensors").read_bytes() == weights
    # compare_with: another model's Dice beside this one's, only when it was validated on the same cases
    other = json.loads((tmp_path / "model" / "blob.json").read_text(encoding="utf-8"))
    other["name"], other["validation"]["dice"] = "other", {"lesion": 0.123}
    (tmp_path / "model" / "other.json").write_text(json.dumps(other), encoding="utf-8")
    compare = {**config, "compare_with": [str(tmp_path / "model" / "other.json")]}
    (tmp_path / "compare.json").write_text(json.dumps(compare), encoding="utf-8")
    assert main(["train", "--config", str(tmp_path / "compare.json"), "--evaluate-only", "--progress", "none"]) == 0
    compared = ModelCard.load(tmp_path / "model" / "blob.json").validation
    assert compared["compared_with"] == {"other": {"lesion": 0.123}} and compared["dice"] == card.validation["dice"]
    other["validation"]["cases"] = 3
    (tmp_path / "model" / "other.json").write_text(json.dumps(other), encoding="utf-8")
    assert main(["train", "--config", str(tmp_path / "compare.json"), "--evaluate-only", "--progress", "none"]) == 2
    torch.set_num_threads(threads)
    # and it refuses to run without the weights
    (tmp_path / "model" / "blob.safetensors").unlink()
    assert main(["train", "--config", str(tmp_path / "config.json"), "--evaluate-only", "--progress", "none"]) == 2


def test_review_threshold_is_a_low_percentile_of_the_good_cases(tmp_path):
    card = ModelCard.from_dict({"name": "t", "architecture": {"name": "unet"}, "classes": CLASSES,
                                "groups": {"lesion": [1, 4]}, "default_target": "lesion",
                                "preprocessing": {}, "patch_size": [16, 16, 16], "weights": "t.safetensors"},
                               root=tmp_path)
    good_mu = [0.10, 0.12, 0.14, 0.16, 0.18, 0.20]
    dice = [{"lesion": 0.8}] * len(good_mu) + [{"lesion": GOOD_CASE_DICE - 0.01}, {"lesion": 0.1}]
    mu = good_mu + [0.01, 0.02]  # poor cases do not pull the threshold down
    review = review_calibration(dice, mu, card)
    assert review["mean_sa_below"] == pytest.approx(np.percentile(good_mu, 5), abs=1e-4)
    assert review["mean_sa_below"] == pytest.approx(0.105, abs=1e-4)
    assert "6 of 8 validation cases" in review["basis"]
    assert review_calibration(dice[:4], mu[:4], card) == {}  # four good cases: too few
