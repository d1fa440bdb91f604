"""An nnU-Net v2 model segments in SegXAI exactly as ``nnUNetv2_predict`` does, and its files are read as data.

The model is the committed ``SegXAILib/models/weights/nnunet-lesion-tiny`` (trained by nnU-Net's own trainer on
eight synthetic lesion cases: docs/nnunet.md). The reference is nnU-Net's own command, ``nnUNetv2_predict``, run
as a subprocess on a scan file with the model laid out as nnU-Net's results folder expects.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SegXAILib.errors import SegXAIError
from SegXAILib.models import registry
from SegXAILib.models.nnunet import card_from_nnunet, is_nnunet_folder, read_checkpoint

pytest.importorskip("nnunetv2", reason="nnU-Net models need nnunetv2 (pip install 'segxai[nnunet]')")

MODEL = registry.BUNDLED_DIR / "nnunet-lesion-tiny"
DATASET = "Dataset901_SegXAILesion"
TRAINED = "nnUNetTrainer__nnUNetPlans_tiny__3d_fullres"
HELD_OUT_SEED = 1000  # the model was trained on seeds 0-7
SCAN_SPACING_MM = 2.5  # the plans' is 3 mm: nnU-Net resamples the scan there and the logits back


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    return held_out_case(tmp_path_factory.mktemp("held_out"))


def held_out_case(folder: Path) -> tuple[Path, np.ndarray]:
    """A synthetic lesion case the model never saw, on a 2.5 mm grid, written into ``folder``: its scan file
    (``scans/case_0000.nii.gz``, nnU-Net's name for channel 0) and its lesion mask (K, J, I)."""
    from SegXAILib.data.lesion import synthesize_lesion
    from SegXAILib.data.samples import read_host
    from SegXAILib.volume import write_volume

    case = synthesize_lesion(read_host("colin27"), seed=HELD_OUT_SEED)
    write_volume(case.image, folder / "image.nii.gz")
    write_volume(case.label, folder / "label.nii.gz")
    image = sitk.ReadImage(str(folder / "image.nii.gz"), sitk.sitkFloat32)
    size = [round(n * s / SCAN_SPACING_MM) for n, s in zip(image.GetSize(), image.GetSpacing())]

    def coarse(volume: sitk.Image, interpolator: int) -> sitk.Image:
        return sitk.Resample(volume, size, sitk.Transform(), interpolator, volume.GetOrigin(), (SCAN_SPACING_MM,) * 3,
                             volume.GetDirection(), 0, volume.GetPixelID())

    scans = folder / "scans"
    scans.mkdir()
    sitk.WriteImage(coarse(image, sitk.sitkLinear), str(scans / "case_0000.nii.gz"))
    lesion = coarse(sitk.ReadImage(str(folder / "label.nii.gz")) > 0, sitk.sitkNearestNeighbor)
    return scans / "case_0000.nii.gz", sitk.GetArrayFromImage(lesion).astype(bool)


@pytest.fixture(scope="module")
def nnunet_labels(held_out: tuple[Path, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """``nnUNetv2_predict``'s labels (K, J, I) for the held-out scan: default tile step (0.5), mirroring on."""
    root = tmp_path_factory.mktemp("nnunet")
    trained = root / "results" / DATASET / TRAINED
    (trained / "fold_0").mkdir(parents=True)
    for name in ("dataset.json", "plans.json", "fold_0/checkpoint_final.pth"):
        shutil.copy(MODEL / name, trained / name)
    env = {**os.environ, "nnUNet_results": str(root / "results"), "nnUNet_raw": str(root / "raw"),
           "nnUNet_preprocessed": str(root / "preprocessed")}
    command = [str(Path(sys.executable).parent / "nnUNetv2_predict"), "-i", str(held_out[0].parent),
               "-o", str(root / "out"), "-d", DATASET, "-c", "3d_fullres", "-p", "nnUNetPlans_tiny",
               "-tr", "nnUNetTrainer", "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1"]
    done = subprocess.run(command, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return sitk.GetArrayFromImage(sitk.ReadImage(str(root / "out" / "case.nii.gz")))


@pytest.mark.slow
def test_labels_equal_nnunet_predict(held_out: tuple[Path, np.ndarray], nnunet_labels: np.ndarray) -> None:
    from SegXAILib.inference import labels_on_grid, segment
    from SegXAILib.volume import read_volume

    model = registry.load_model(MODEL)
    scan = read_volume(held_out[0])
    result = segment(scan, model, device="cpu")
    lesion = held_out[1]
    found = nnunet_labels == 1
    dice = 2 * (found & lesion).sum() / (found.sum() + lesion.sum())
    assert dice > 0.5, f"nnU-Net's segmentation of the held-out lesion is trivial (Dice {dice:.2f})"
    assert result.labels.shape == nnunet_labels.shape
    assert np.array_equal(result.labels.array, nnunet_labels), \
        f"{int((result.labels.array != nnunet_labels).sum())} voxels differ from nnUNetv2_predict"
    # a scan with no file (a Slicer volume) is handed over to nnU-Net's preprocessing: the same labels
    in_memory = segment(scan.with_array(scan.array.copy()), model, device="cpu")
    assert np.array_equal(in_memory.labels.array, nnunet_labels)
    # the probabilities are the network's on nnU-Net's preprocessed grid, where explanations run: that grid's
    # geometry puts them where nnU-Net's labels are (one voxel off, the lesion's overlap falls to about 0.85)
    assert result.probabilities.shape == (2, *result.model_grid.shape)
    on_scan = labels_on_grid(result.probabilities, result.model_grid, scan, [0, 1]).array == 1
    assert (on_scan & found).sum() / (on_scan | found).sum() > 0.99


def test_card_from_the_folder() -> None:
    card = card_from_nnunet(MODEL)
    plans = json.loads((MODEL / "plans.json").read_text())
    assert is_nnunet_folder(MODEL)
    assert [(c.name, c.label) for c in card.classes] == [("background", 0), ("lesion", 1)]
    assert card.input_channels == 1
    assert list(card.patch_size) == plans["configurations"]["3d_fullres"]["patch_size"]
    assert card.extra["nnunet_configuration"] == "3d_fullres"
    assert "nnunet-lesion-tiny" in registry.available_cards()  # segxai models lists it


def test_checkpoint_with_an_unexpected_global_is_refused(tmp_path: Path) -> None:
    checkpoint = read_checkpoint(MODEL / "fold_0" / "checkpoint_final.pth")
    checkpoint["init_args"]["hook"] = os.system  # pickled as a reference to os.system: unpickling would fetch it
    folder = tmp_path / "nnunet-model"
    (folder / "fold_0").mkdir(parents=True)
    for name in ("dataset.json", "plans.json"):
        shutil.copy(MODEL / name, folder / name)
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(SegXAIError) as refused:
        registry.load_model(folder)
    message = str(refused.value)
    assert "refusing" in message and f"{os.system.__module__}.system" in message and "\n" not in message


def test_plans_naming_other_code_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "nnunet-model"
    shutil.copytree(MODEL, folder)
    plans = json.loads((folder / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "os.system"
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(SegXAIError, match="refusing nnU-Net model .* names 'os.system' as its network"):
        registry.load_model(folder)
