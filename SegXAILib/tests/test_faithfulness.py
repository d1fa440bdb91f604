"""Faithfulness metrics against hand-computed cases, and ``segxai evaluate-maps`` on a real explain folder."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from SegXAILib.cli import main
from SegXAILib.errors import SegXAIError
from SegXAILib.faithfulness import auc, binarised_scores, perturbation_curves, ranking, resolve_baseline
from SegXAILib.inference import target_mask

from .conftest import make_card

GRID = (32, 32, 32)


class Pointwise(nn.Module):
    """Target exactly where the voxel itself is brighter than 0.5 (no context)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), 40.0 * (x - 0.5)], dim=1)


class LocalEvidence(nn.Module):
    """Target where the 3^3 box around a voxel is mostly bright: the evidence is the bright voxels nearby."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = F.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=True)
        return torch.cat([torch.zeros_like(mean), 40.0 * (mean - 0.5)], dim=1)


def test_thresholded_dice_explained_and_perturbation_ratio_by_hand():
    obj = np.zeros(GRID, bool)
    obj[10:20, 10:20, 10:20] = True  # 1000 voxels, the only bright ones
    image = torch.from_numpy(obj.astype(np.float32))[None, None]
    saliency = np.zeros(GRID)
    saliency[10:15, 10:20, 10:20] = 1.0  # first half of the object
    saliency[15:20, 10:20, 10:20] = 0.15  # second half
    saliency[0:2, 0:10, 0:10] = 0.3  # 200 voxels of empty background
    n = saliency.size
    scores = binarised_scores(Pointwise(), image, saliency, [1], thresholds=(0.0, 0.1, 0.2),
                              top_fractions=(500 / n, 700 / n))
    top500, top700 = f"top{100 * 500 / n:g}pct", f"top{100 * 700 / n:g}pct"
    # > 0 and > 0.1 keep the object and the 200 background voxels; > 0.2 keeps half the object and those
    # 200; the top 500 are the first half, the top 700 add the 0.3 voxels. Only kept object voxels stay bright
    expected = {"gt0": (1.0, 1.2, 1200), "gt0.1": (1.0, 1.2, 1200), "gt0.2": (2 * 500 / 1500, 0.7, 700),
                top500: (2 * 500 / 1500, 0.5, 500), top700: (2 * 500 / 1500, 0.7, 700)}
    for name, (dice_explained, ratio, kept) in expected.items():
        assert scores[f"dice_explained_{name}"] == pytest.approx(dice_explained)
        assert scores[f"perturbation_ratio_{name}"] == pytest.approx(ratio)
        assert scores[f"image_preserved_{name}"] == pytest.approx(kept / n)
    assert len(scores) == 3 * len(expected)


def test_ties_are_ranked_at_random_not_in_raster_order():
    flat = np.zeros((4, 4, 4))
    flat[0, 0, 0] = 1.0
    order = ranking(flat, seed=3)
    assert order[0] == 0
    assert not (np.diff(order[1:]) > 0).all()
    assert (ranking(flat, seed=3) == order).all()


def test_deletion_drops_faster_and_insertion_rises_faster_for_the_true_evidence():
    shape = (24, 24, 24)
    evidence = np.zeros(shape, bool)
    evidence[9:15, 9:15, 9:15] = True  # 1.6% of the grid: inside the first 10% step
    image = torch.from_numpy(evidence.astype(np.float32))[None, None]
    perfect = evidence.astype(np.float64)
    random = np.random.default_rng(0).random(shape)
    network = LocalEvidence()
    good = perturbation_curves(network, image, perfect, [1], steps=10)
    bad = perturbation_curves(network, image, random, [1], steps=10)
    for score in ("probability", "dice"):
        good_deletion, bad_deletion = getattr(good["deletion"], score), getattr(bad["deletion"], score)
        good_insertion, bad_insertion = getattr(good["insertion"], score), getattr(bad["insertion"], score)
        assert good_deletion[0] == bad_deletion[0] > 0.9  # the unperturbed scan
        assert good_deletion[1] < 0.05 < 0.5 < bad_deletion[1]
        assert good_insertion[1] > 0.9 > 0.05 > bad_insertion[1]
        assert getattr(good["deletion"], f"auc_{score}") < getattr(bad["deletion"], f"auc_{score}")
        assert getattr(good["insertion"], f"auc_{score}") > getattr(bad["insertion"], f"auc_{score}")
        assert good_deletion[-1] == good_insertion[0] and good_insertion[-1] == good_deletion[0]
    np.testing.assert_allclose(good["deletion"].fractions, np.linspace(0, 1, 11), atol=1e-4)
    # batches of scans give the same curves as one scan at a time
    batched = perturbation_curves(network, image, random, [1], steps=10, batch_size=4)
    np.testing.assert_allclose(batched["deletion"].probability, bad["deletion"].probability, rtol=1e-5)
    np.testing.assert_allclose(batched["insertion"].dice, bad["insertion"].dice)


def test_target_mask_is_the_argmax_mask_ties_included():
    p = np.random.default_rng(0).dirichlet(np.ones(4), size=(6, 7)).transpose(2, 0, 1)
    for channels in ([1], [1, 3], [0], [0, 1, 2, 3]):
        assert (target_mask(p, channels) == np.isin(p.argmax(0), channels)).all()
    tied = np.array([[0.5, 0.0], [0.5, 0.5], [0.0, 0.5]])  # (3 classes, 2 voxels): the first index wins a tie
    assert target_mask(tied, [1]).tolist() == [False, True]
    assert target_mask(tied, [2]).tolist() == [False, False]
    assert target_mask(torch.from_numpy(tied), [0, 2]).tolist() == [True, False]


def test_baseline_is_a_number_or_the_scans_minimum():
    image = torch.tensor([[[-3.0, 2.0]]])
    assert resolve_baseline("min", image) == -3.0 and resolve_baseline("0.5", image) == 0.5
    with pytest.raises(SegXAIError, match="number or 'min'"):
        resolve_baseline("air", image)


def test_auc_is_the_trapezoid_rule():
    assert auc([0, 0.5, 1], [1, 0, 0]) == pytest.approx(0.25)
    assert auc([0, 0.25, 1], [0, 1, 1]) == pytest.approx(0.875)


def test_evaluate_maps_command_writes_one_row_per_map(tmp_path, scan_file, capsys):
    card = make_card(tmp_path)
    out = tmp_path / "explained"
    assert main(["explain", str(scan_file), "--model", str(card), "--methods", "gradcam,misure", "--out", str(out),
                 "--option", "misure.steps=5", "--no-report", "--progress", "none"]) == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    capsys.readouterr()
    assert main(["evaluate-maps", str(out), "--model", str(card), "--steps", "3", "--progress", "none"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    with open(out / "faithfulness.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["map"] for row in rows] == [item["file"] for item in summary["maps"]]
    assert {row["method"] for row in rows} == {"gradcam", "misure"}
    for row in rows:
        for key in ("dice_explained_gt0.1", "deletion_auc_probability", "insertion_auc_dice"):
            assert 0 <= float(row[key]) <= 1
        assert math.isfinite(float(row["perturbation_ratio_gt0"]))
    assert len(printed) == len(rows) + 1 and printed[-1].endswith("faithfulness.csv")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the CSV was written atomically


@pytest.mark.parametrize("problem", ["no-summary", "other-model"])
def test_evaluate_maps_errors_are_one_line(tmp_path, capsys, problem):
    folder = tmp_path / "folder"
    folder.mkdir()
    if problem == "other-model":
        summary = {"model": {"name": "another"}, "maps": [{"file": "maps/x.nii.gz"}], "target": {"name": "lesion"}}
        (folder / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    assert main(["evaluate-maps", str(folder), "--model", str(make_card(tmp_path)), "--progress", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert ("not found" if problem == "no-summary" else "'another'") in err[0]
    assert not (folder / "faithfulness.csv").exists()
