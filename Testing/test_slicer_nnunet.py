"""An nnU-Net v2 model through the module's logic on a real MRML scene (slicer-core): the committed tiny nnU-Net on
a scan node gives a segmentation equal, voxel for voxel, to the library's ``segment()`` of the same scan, and a
Grad-CAM map node on the scan's grid; a results folder chosen with "Add model folder" lists each model it holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("slicer")
pytest.importorskip("nnunetv2", reason="nnU-Net models need nnunetv2 (pip install 'segxai[nnunet]')")
from test_slicer_bundle_forms import segment_array  # noqa: E402

from SegXAILib.inference import segment  # noqa: E402
from SegXAILib.models import registry  # noqa: E402
from SegXAILib.tests.test_nnunet import MODEL, held_out_case  # noqa: E402
from SegXAILib.tests.test_nnunet_folders import TREE, results_folder  # noqa: E402
from SegXAILib.volume import read_volume  # noqa: E402
from SegXAILogic import ExplainLogic, modelsInFolder, updateNodeFromVolume, volumeFromNode  # noqa: E402
from SegXAILogic.standalone import standaloneScene  # noqa: E402

CROP_VOXELS = 48
"""The scan's side: nnU-Net resamples it to the plans' 3 mm grid, 40 voxels, within one 48-voxel window (a
40-voxel scan leaves too little brain around the lesion for the tiny model to find it)."""


def small_scan(folder: Path) -> Path:
    """The held-out case of ``SegXAILib/tests/test_nnunet.py`` (2.5 mm voxels) cut to a 48-voxel cube around its
    lesion (its geometry kept), so that the model runs on one window: ``folder/scan.nii.gz``."""
    scan_path, lesion = held_out_case(folder)
    image = sitk.ReadImage(str(scan_path))
    size = np.minimum(CROP_VOXELS, image.GetSize())
    centre = np.round(np.argwhere(lesion).mean(axis=0)).astype(int)[::-1]  # (K, J, I) -> SimpleITK's (I, J, K)
    corner = np.clip(centre - size // 2, 0, np.array(image.GetSize()) - size)
    sitk.WriteImage(sitk.RegionOfInterest(image, size.tolist(), corner.tolist()), str(folder / "scan.nii.gz"))
    return folder / "scan.nii.gz"


def test_a_results_folder_adds_each_model_it_holds(tmp_path):
    results = results_folder(tmp_path / "nnUNet_results")
    assert modelsInFolder(results) == {name: str(results / relative) for relative, name in TREE.items()}
    assert modelsInFolder(MODEL) == {"nnunet-lesion-tiny": str(MODEL)}  # a model folder is itself
    (tmp_path / "empty").mkdir()
    assert modelsInFolder(tmp_path / "empty") == {}


@pytest.mark.slow
def test_nnunet_segmentation_and_gradcam_nodes(tmp_path):
    scan = read_volume(small_scan(tmp_path))
    scene = standaloneScene().scene
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "T1")
    updateNodeFromVolume(node, scan)
    results = ExplainLogic(scene).run(node, str(MODEL), ["gradcam"], device="cpu", outDir=tmp_path / "out")

    expected = segment(scan, registry.load_model(MODEL), device="cpu").labels.array
    assert (expected == 1).sum() > 1000  # the lesion is found: the masks compared are not empty
    lesion = segment_array(results.segmentation, "lesion", node)
    assert lesion.shape == expected.shape
    assert np.array_equal(lesion > 0, expected == 1), f"{int(((lesion > 0) != (expected == 1)).sum())} voxels differ"

    gradcam = volumeFromNode(results.map("gradcam"))
    assert gradcam.same_grid(scan, atol=1e-4)
    assert np.isfinite(gradcam.array).all() and gradcam.array.max() > 0
