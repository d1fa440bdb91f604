"""A folder of nnU-Net trained models (an nnU-Net or TotalSegmentator results folder): every trained-model folder
in it, up to two levels deep, is listed by a distinct name without opening a checkpoint or importing torch; naming
the folder as the model takes the one model it holds, and refuses in one line a folder holding several.

The trained-model folders are copies of the committed ``nnunet-lesion-tiny`` laid out as ``nnUNetv2_train`` lays
out its results: ``DatasetXXX_Name/Trainer__Plans__Configuration`` (the folder's name gives the configuration).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from SegXAILib.cli import main
from SegXAILib.models import registry

TINY = registry.BUNDLED_DIR / "nnunet-lesion-tiny"
REPO = Path(__file__).resolve().parents[2]
TREE = {  # trained-model folder under the results folder -> the name SegXAI gives it
    "Dataset901_SegXAILesion/nnUNetTrainer__nnUNetPlans_tiny__3d_fullres":
        "Dataset901_SegXAILesion-nnUNetPlans_tiny-3d_fullres",
    "Dataset901_SegXAILesion/nnUNetTrainerNoMirroring__nnUNetPlans_tiny__3d_fullres":
        "Dataset901_SegXAILesion-nnUNetTrainerNoMirroring-nnUNetPlans_tiny-3d_fullres",
    "Dataset902_SegXAILesionCopy/nnUNetTrainer__nnUNetPlans__3d_fullres": "Dataset902_SegXAILesionCopy-3d_fullres",
}


def trained_model(folder: Path, checkpoint: bytes | None = None) -> Path:
    """A copy of the tiny model as ``nnUNetv2_train`` writes it to ``folder`` (dataset.json, plans.json naming the
    dataset folder above it, fold_0/checkpoint_final.pth: ``checkpoint`` bytes instead of the real one if given)."""
    (folder / "fold_0").mkdir(parents=True)
    shutil.copy(TINY / "dataset.json", folder / "dataset.json")
    plans = json.loads((TINY / "plans.json").read_text(encoding="utf-8"))
    plans["dataset_name"] = folder.parent.name  # nnU-Net names the dataset folder after it
    (folder / "plans.json").write_text(json.dumps(plans), encoding="utf-8")
    if checkpoint is None:
        shutil.copy(TINY / "fold_0" / "checkpoint_final.pth", folder / "fold_0" / "checkpoint_final.pth")
    else:
        (folder / "fold_0" / "checkpoint_final.pth").write_bytes(checkpoint)
    return folder


def results_folder(root: Path, checkpoint: bytes | None = None) -> Path:
    for relative in TREE:
        trained_model(root / relative, checkpoint)
    return root


def cli_process(*args: str | Path, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, list[str]]:
    """``segxai ARGS`` in a real process, with the modules it imported (``-X importtime`` lists them on stderr)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "SegXAILib.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=120, env={**os.environ, **(env or {})})
    imported = [line.rpartition("|")[2].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    return proc, imported


def test_models_lists_every_trained_model_of_a_results_folder_without_torch(tmp_path):
    # checkpoints of junk bytes: a listing that opened one would fail on it and leave the model out
    results = results_folder(tmp_path / "nnUNet_results", checkpoint=b"not a checkpoint")
    trained_model(tmp_path / "nnUNet_results" / "deeper" / "Dataset903_Deep" / "nnUNetTrainer__nnUNetPlans__2d")
    proc, imported = cli_process("models", env={"SEGXAI_MODEL_PATH": str(results)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = proc.stdout.split()
    for relative, name in TREE.items():
        assert name in listed and str(results / relative) in listed, (name, proc.stdout)
    assert "nnunet-lesion-tiny" in listed  # the bundled models are still there
    assert not any("Dataset903_Deep" in word for word in listed)  # three levels down: beyond the search
    assert "SegXAILib.models.registry" in imported and "torch" not in imported


def test_names_resolve_to_their_folders(tmp_path, monkeypatch):
    results = results_folder(tmp_path / "nnUNet_results")
    monkeypatch.setenv("SEGXAI_MODEL_PATH", str(results))
    cards = registry.available_cards()
    assert {name: cards[name] for name in TREE.values()} == {name: results / relative
                                                             for relative, name in TREE.items()}
    for relative, name in TREE.items():
        card = registry.resolve_card(name)
        assert card.name == name and Path(card.extra["nnunet_root"]) == (results / relative).resolve()


@pytest.mark.parametrize("parent", ["nnUNet_results", "nnUNet_results/Dataset901_SegXAILesion"])
def test_a_folder_of_several_models_is_one_error_line_before_torch(tmp_path, scan_file, parent):
    results_folder(tmp_path / "nnUNet_results")
    folder = tmp_path / parent
    held = sorted(str((tmp_path / "nnUNet_results" / r).relative_to(folder)) for r in TREE
                  if (tmp_path / "nnUNet_results" / r).is_relative_to(folder))
    proc, imported = cli_process("explain", scan_file, "--model", folder, "--methods", "gradcam",
                                 "--out", tmp_path / "o")
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith(f"error: {folder} holds {len(held)} nnU-Net models ("), errors
    assert all(relative in errors[0] for relative in held), errors[0]
    assert errors[0].endswith(f"choose one by giving its folder, e.g. {folder / held[0]}")
    assert "torch" not in imported and not (tmp_path / "o").exists()


def test_a_folder_holding_one_model_is_that_model(tmp_path, scan_file):
    dataset = tmp_path / "nnUNet_results" / "Dataset902_SegXAILesionCopy"
    trained = trained_model(dataset / "nnUNetTrainer__nnUNetPlans__3d_fullres")
    assert registry.models_in_folder(tmp_path / "nnUNet_results") == [trained]
    for parent in (tmp_path / "nnUNet_results", dataset):
        card = registry.resolve_card(parent)
        assert card.name == "Dataset902_SegXAILesionCopy-3d_fullres"
        assert Path(card.extra["nnunet_root"]) == trained.resolve()
    pytest.importorskip("nnunetv2", reason="running an nnU-Net model needs nnunetv2")
    out = tmp_path / "out"
    assert main(["segment", str(scan_file), "--model", str(tmp_path / "nnUNet_results"), "--out", str(out),
                 "--progress", "none"]) == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["model"]["name"] == "Dataset902_SegXAILesionCopy-3d_fullres"
