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
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SegXAILib.errors import SegXAIError
from SegXAILib.models import registry
from SegXAILib.models.loaders import LoadedModel
from SegXAILib.models.nnunet import card_from_nnunet, is_nnunet_folder, read_checkpoint

pytest.importorskip("nnunetv2", reason="nnU-Net models need nnunetv2 (pip install 'segxai[nnunet]')")

MODEL = registry.BUNDLED_DIR / "nnunet-lesion-tiny"
DATASET = "Dataset901_SegXAILesion"
TRAINER_AND_PLANS = "nnUNetTrainer__nnUNetPlans_tiny"  # + "__<configuration>": nnU-Net's folder name
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


def nnunet_predict(scans: Path, model: Path, root: Path, *options: str, configuration: str = "3d_fullres"
                   ) -> tuple[np.ndarray, Path]:
    """``nnUNetv2_predict``'s labels (K, J, I) for the scans in ``scans`` by the trained-model folder ``model`` of
    ``configuration`` (laid out in a results folder under ``root`` as nnU-Net expects), and its output folder;
    default tile step (0.5)."""
    trained = root / "results" / DATASET / f"{TRAINER_AND_PLANS}__{configuration}"
    for path in model.glob("**/*"):
        if path.is_file() and path.name != "segxai.json":
            (trained / path.relative_to(model)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, trained / path.relative_to(model))
    env = {**os.environ, "nnUNet_results": str(root / "results"), "nnUNet_raw": str(root / "raw"),
           "nnUNet_preprocessed": str(root / "preprocessed")}
    command = [str(Path(sys.executable).parent / "nnUNetv2_predict"), "-i", str(scans), "-o", str(root / "out"),
               "-d", DATASET, "-c", configuration, "-p", "nnUNetPlans_tiny", "-tr", "nnUNetTrainer", "-device", "cpu",
               "-npp", "1", "-nps", "1", *options]
    done = subprocess.run(command, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return sitk.GetArrayFromImage(sitk.ReadImage(str(root / "out" / "case.nii.gz"))), root / "out"


FOLDS = ("0", "1")
"""The committed model's folds (docs/nnunet.md)."""


@pytest.fixture(scope="module")
def nnunet_labels(held_out: tuple[Path, np.ndarray], tmp_path_factory: pytest.TempPathFactory
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``nnUNetv2_predict``'s labels (K, J, I) and saved probabilities (n_classes, K, J, I) for the held-out scan:
    every fold, mirroring on (nnU-Net's defaults)."""
    labels, out = nnunet_predict(held_out[0].parent, MODEL, tmp_path_factory.mktemp("nnunet"), "-f", *FOLDS,
                                 "--save_probabilities")
    return labels, np.load(out / "case.npz")["probabilities"]


@pytest.fixture(scope="module")
def prepared(held_out: tuple[Path, np.ndarray]) -> tuple[LoadedModel, torch.Tensor]:
    """The committed model and the held-out scan after nnU-Net's preprocessing, (1, 1, K', J', I')."""
    from SegXAILib.volume import read_volume

    model = registry.load_model(MODEL)
    return model, model.pipeline.preprocess([read_volume(held_out[0])]).image


@pytest.mark.slow
def test_labels_and_probabilities_equal_nnunet_predict(held_out: tuple[Path, np.ndarray],
                                                       nnunet_labels: tuple[np.ndarray, np.ndarray]) -> None:
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    from SegXAILib.inference import labels_on_grid, segment
    from SegXAILib.volume import read_volume

    labels, saved_probabilities = nnunet_labels
    model = registry.load_model(MODEL)
    assert len(model.card.weight_paths) == len(FOLDS) and model.card.inference["mirror_axes"] == [0, 1, 2]
    scan = read_volume(held_out[0])
    result = segment(scan, model, device="cpu")
    lesion = held_out[1]
    found = labels == 1
    dice = 2 * (found & lesion).sum() / (found.sum() + lesion.sum())
    assert dice > 0.5, f"nnU-Net's segmentation of the held-out lesion is trivial (Dice {dice:.2f})"
    assert result.labels.shape == labels.shape
    assert np.array_equal(result.labels.array, labels), \
        f"{int((result.labels.array != labels).sum())} voxels differ from nnUNetv2_predict"
    # SegXAI's probabilities through nnU-Net's export are nnUNetv2_predict's saved ones (log p differs from the
    # logits by a constant per voxel, which the export's linear resampling and softmax cancel)
    p = nnunet_model(model)
    prepared = model.pipeline.preprocess([scan])
    _, exported = convert_predicted_logits_to_segmentation_with_correct_shape(
        torch.log(torch.from_numpy(result.probabilities)), p.plans_manager, p.configuration_manager, p.label_manager,
        prepared.properties, return_probabilities=True)
    assert exported.shape == saved_probabilities.shape
    assert np.abs(exported - saved_probabilities).max() < 2e-3  # nnU-Net saves float16 probabilities
    # the probabilities are the network's on nnU-Net's preprocessed grid, where explanations run: that grid's
    # geometry puts them where nnU-Net's labels are
    assert result.probabilities.shape == (2, *result.model_grid.shape)
    on_scan = labels_on_grid(result.probabilities, result.model_grid, scan, [0, 1]).array == 1
    assert (on_scan & found).sum() / (on_scan | found).sum() > 0.99


@pytest.mark.slow
def test_one_fold_without_mirroring_equals_nnunet_predict(held_out: tuple[Path, np.ndarray],
                                                          nnunet_labels: tuple[np.ndarray, np.ndarray],
                                                          tmp_path: Path) -> None:
    from SegXAILib.inference import segment
    from SegXAILib.volume import read_volume

    folder = tmp_path / "model"
    shutil.copytree(MODEL, folder)
    (folder / "segxai.json").write_text(json.dumps({"configuration": "3d_fullres", "folds": [0], "mirroring": False}))
    labels, _ = nnunet_predict(held_out[0].parent, folder, tmp_path / "nnunet", "-f", "0", "--disable_tta")
    model = registry.load_model(folder)
    assert len(model.card.weight_paths) == 1 and model.card.inference["mirror_axes"] == []
    scan = read_volume(held_out[0])
    result = segment(scan, model, device="cpu")
    assert np.array_equal(result.labels.array, labels), \
        f"{int((result.labels.array != labels).sum())} voxels differ from nnUNetv2_predict -f 0 --disable_tta"
    # a scan with no file (a Slicer volume) is handed over to nnU-Net's preprocessing: the same labels
    in_memory = segment(scan.with_array(scan.array.copy()), model, device="cpu")
    assert np.array_equal(in_memory.labels.array, labels)
    differ = int((labels != nnunet_labels[0]).sum())
    assert differ > 100, f"one fold without mirroring should differ from all folds mirrored; {differ} voxels do"


def nnunet_model(model: LoadedModel) -> Any:
    """nnU-Net's own predictor inside a loaded nnU-Net model."""
    return model.pipeline.predictor


def nnunet_window_logits(model: LoadedModel, image: torch.Tensor, folds: list[int], mirroring: bool) -> torch.Tensor:
    """nnU-Net's predictor's logits (n_classes, K', J', I') for a preprocessed (1, C, K', J', I') image: the mean
    over ``folds``, with or without its test-time mirroring (float16 sums, as nnU-Net computes them)."""
    p = nnunet_model(model)
    every, p.list_of_parameters = p.list_of_parameters, [p.list_of_parameters[f] for f in folds]
    p.use_mirroring = mirroring
    try:
        return p.predict_logits_from_preprocessed_data(image[0]).float()
    finally:
        p.list_of_parameters, p.use_mirroring = every, True


def test_explanations_run_in_nnunets_windows(prepared: tuple[LoadedModel, torch.Tensor]) -> None:
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    from SegXAILib.inference import sliding_window_predict
    from SegXAILib.models.card import Windows

    model, image = prepared
    windows = model.card.windows
    assert windows.placement == "nnunet" and windows.overlap == 0.5 and any(n > s for n, s in zip(
        image.shape[2:], windows.size)), "the case must need several windows"
    ours = sliding_window_predict(model.network, image, windows, torch.device("cpu"))[0]
    # nnU-Net's windows (its own slicers and Gaussian) summed in float32: the same numbers
    p = nnunet_model(model)
    gaussian = compute_gaussian(windows.size, 1 / 8, 10, dtype=torch.float32, device=torch.device("cpu"))
    total, weight = torch.zeros(ours.shape), torch.zeros(ours.shape[1:])
    with torch.inference_mode():
        for box in p._internal_get_sliding_window_slicers(image.shape[2:]):
            total[box] += model.network(image[0][box][None])[0] * gaussian
            weight[box[1:]] += gaussian
    assert torch.allclose(ours, total / weight, atol=1e-5)
    # and nnU-Net's predictor itself (fold 0, no mirroring) up to its float16 sums
    theirs = nnunet_window_logits(model, image, [0], mirroring=False)
    assert (ours - theirs).abs().max() < 0.05 * theirs.abs().max()
    assert (ours.argmax(0) == theirs.argmax(0)).float().mean() > 0.999
    # MONAI's windows fall elsewhere here: the comparison sees where the windows are
    monai = sliding_window_predict(model.network, image, Windows(windows.size, 0.5, "gaussian", 0.125, "constant", 0.0),
                                   torch.device("cpu"))[0]
    assert (monai - theirs).abs().max() > 0.2 * theirs.abs().max()


def test_tta_is_nnunets_mirroring(prepared: tuple[LoadedModel, torch.Tensor]) -> None:
    from SegXAILib.progress import Progress
    from SegXAILib.symmetries import mirrorings
    from SegXAILib.uncertainty.sampling import TTAOptions, TTAUncertainty, mirrored_logits

    model, image = prepared
    crop = image[..., :48, :48, :]  # two windows: the mirroring is inside each, as nnU-Net's
    transforms = TTAUncertainty().transforms(TTAOptions(), model)
    assert [t.flips for t in transforms] == [t.flips for t in mirrorings([0, 1, 2])] and len(transforms) == 8
    mean = torch.stack([mirrored_logits(model.network, crop, t.flips, model.card.windows, torch.device("cpu"),
                                        Progress(), "tta")[0] for t in transforms]).mean(0)
    theirs = nnunet_window_logits(model, crop, [0], mirroring=True)
    assert (mean - theirs).abs().max() < 0.05 * theirs.abs().max()
    plain = nnunet_window_logits(model, crop, [0], mirroring=False)
    assert (plain - theirs).abs().max() > 0.2 * (mean - theirs).abs().max()  # the mirror images matter here


def test_fold_ensemble_entropy_is_the_formula_on_nnunets_folds(prepared: tuple[LoadedModel, torch.Tensor]) -> None:
    from SegXAILib.explain.base import ExplainContext
    from SegXAILib.uncertainty.sampling import EnsembleUncertainty

    model, image = prepared
    crop = image[..., :48, :48, :48]
    folds = [torch.softmax(nnunet_window_logits(model, crop, [f], mirroring=False), 0) for f in range(len(FOLDS))]
    mean = torch.stack(folds).mean(0).numpy()
    entropy = -(mean * np.log(np.clip(mean, 1e-12, None))).sum(0)
    context = ExplainContext(model, crop, "lesion", [1], mean)
    explanation = EnsembleUncertainty().explain(context)
    ours = next(m.array for m in explanation.maps if m.variant == "entropy")
    assert explanation.metadata["members"] == ["fold_0/checkpoint_final.pth", "fold_1/checkpoint_final.pth"]
    # nnU-Net sums in float16: within 4 voxels of the window's edge its Gaussian weights are below float16's
    # resolution and its logits lose digits (entropy off by up to 0.09 there); inside, float16 rounding only
    inner = (slice(4, -4),) * 3
    assert np.abs(ours - entropy)[inner].max() < 5e-3
    assert entropy.max() > 0.3, "the folds must disagree somewhere for the test to see them"


def test_card_from_the_folder() -> None:
    card = card_from_nnunet(MODEL)
    plans = json.loads((MODEL / "plans.json").read_text())
    assert is_nnunet_folder(MODEL)
    assert [(c.name, c.label) for c in card.classes] == [("background", 0), ("lesion", 1)]
    assert card.input_channels == 1
    assert list(card.patch_size) == plans["configurations"]["3d_fullres"]["patch_size"]
    assert card.extra["nnunet_configuration"] == "3d_fullres"
    assert "nnunet-lesion-tiny" in registry.available_cards()  # segxai models lists it


def refused_checkpoint(folder: Path) -> Path:
    """The tiny model's fold 0 in ``folder`` with a checkpoint that also pickles a reference to ``os.system``."""
    checkpoint = read_checkpoint(MODEL / "fold_0" / "checkpoint_final.pth")
    checkpoint["init_args"]["hook"] = os.system  # pickled as a reference to os.system: unpickling would fetch it
    (folder / "fold_0").mkdir(parents=True)
    for name in ("dataset.json", "plans.json"):
        shutil.copy(MODEL / name, folder / name)
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    return folder


def refused_plans(folder: Path) -> Path:
    """The tiny model in ``folder`` with plans naming ``os.system`` as its network class."""
    shutil.copytree(MODEL, folder)
    plans = json.loads((folder / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "os.system"
    (folder / "plans.json").write_text(json.dumps(plans))
    return folder


def test_checkpoint_with_an_unexpected_global_is_refused(tmp_path: Path) -> None:
    folder = refused_checkpoint(tmp_path / "nnunet-model")
    with pytest.raises(SegXAIError) as refused:
        registry.load_model(folder)
    message = str(refused.value)
    assert "refusing" in message and f"{os.system.__module__}.system" in message and "\n" not in message


def test_plans_naming_other_code_are_refused(tmp_path: Path) -> None:
    folder = refused_plans(tmp_path / "nnunet-model")
    with pytest.raises(SegXAIError, match="refusing nnU-Net model .* names 'os.system' as its network"):
        registry.load_model(folder)


@pytest.mark.parametrize("make, says", [(refused_checkpoint, f"({os.system.__module__}.system)"),
                                        (refused_plans, "names 'os.system' as its network")])
def test_segment_refuses_the_model_with_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             make: Any, says: str) -> None:
    from SegXAILib.cli import main
    from SegXAILib.tests.conftest import oblique_scan
    from SegXAILib.volume import write_volume

    folder = make(tmp_path / "nnunet-model")
    scan = write_volume(oblique_scan((16, 16, 16)), tmp_path / "scan.nii.gz")
    code = main(["segment", str(scan), "--model", str(folder), "--out", str(tmp_path / "out"), "--device", "cpu"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: refusing") and says in lines[0]
    assert not (tmp_path / "out").exists()


def test_gradcam_in_nnunets_windows_equals_whole_volume_gradcam_on_one_window(
        prepared: tuple[LoadedModel, torch.Tensor]) -> None:
    """On a case of one window, Grad-CAM stitched from nnU-Net's windows (the layers' activations and gradients
    on their own coarser grids, placed and weighted as nnU-Net places windows) is Grad-CAM of the whole volume."""
    from SegXAILib.explain.base import ExplainContext
    from SegXAILib.explain.gradcam import SegGradCAM, probe_input, target_region
    from SegXAILib.explain.layers import resolve_layers
    from SegXAILib.inference import sliding_window_predict

    model, image = prepared
    windows = model.card.windows
    crop = image[(..., *(slice(10, 10 + size) for size in windows.size))]  # one window, around the lesion
    probabilities = torch.softmax(sliding_window_predict(model.network, crop, windows, torch.device("cpu")), 1)[0]
    context = ExplainContext(model, crop, "lesion", [1], probabilities.numpy(),
                             options={"gradcam": {"layer": ["last_decoder", "bottleneck"]}})
    explainer = SegGradCAM()
    options = context.options_for(explainer)
    region = target_region(context, options).mask
    assert region.sum() > 1000, "the crop must hold the lesion"
    named = dict(model.network.named_modules())
    modules = [named[name] for spec in options.layer
               for name, _ in resolve_layers(model.network, spec, probe_input(context))]
    windowed_score, windowed = explainer._sliding_window(context, region, modules, windows)
    whole_score, whole = explainer._single_window(context, region, modules)
    assert windowed_score == pytest.approx(whole_score, rel=1e-4)
    for a, b in zip(windowed, whole):  # the bottleneck's map comes from a grid 16 times coarser
        assert torch.allclose(a, b, atol=1e-4 * float(b.abs().max())), float((a - b).abs().max())
