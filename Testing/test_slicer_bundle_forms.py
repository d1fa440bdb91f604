"""A multi-label, multi-sequence MONAI bundle (the BraTS form) through the module's logic on a real MRML scene
(slicer-core): one input node per sequence, in the model's order, and its overlapping classes as overlapping
segments, each equal to the command line's file of that class."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("slicer")
from SegXAILib.tests.test_bundle_pipeline import BRATS, write_sequences, zoo_bundle  # noqa: E402
from SegXAILib.volume import read_volume  # noqa: E402
from SegXAILogic import ExplainLogic, modelSequences, modelTargets, updateNodeFromVolume  # noqa: E402
from SegXAILogic.scores import sequenceShares  # noqa: E402
from SegXAILogic.standalone import standaloneScene  # noqa: E402


def segment_array(segmentation_node, name: str, reference) -> np.ndarray:
    """A segment's voxels on the reference node's grid (0/1), exported alone through Slicer's segmentations logic."""
    import slicer
    import slicer.util
    import vtk

    scene = segmentation_node.GetScene()
    segmentation = segmentation_node.GetSegmentation()
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(next(segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())
                             if segmentation.GetNthSegment(i).GetName() == name))
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{name} (export)")
    try:
        assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap,
                                                                                     reference)
        return slicer.util.arrayFromVolume(labelmap).copy()
    finally:
        scene.RemoveNode(labelmap)


@pytest.mark.slow
def test_four_sequence_nodes_give_overlapping_segments(tmp_path):
    sequence_files = write_sequences(tmp_path)
    folder = zoo_bundle(tmp_path / "brats", BRATS, sequence_files)
    assert modelSequences(str(folder)) == ["T1c", "T1", "T2", "FLAIR"]
    assert modelTargets(str(folder))[1] == ["Tumor core", "Whole tumor", "Enhancing tumor"]
    scene = standaloneScene().scene
    nodes = []
    for name, path in zip(modelSequences(str(folder)), sequence_files):
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        updateNodeFromVolume(node, read_volume(path))
        nodes.append(node)
    results = ExplainLogic(scene).run(nodes, str(folder), ["gradcam", "sequences"], targetClass="Whole tumor",
                                      device="cpu", outDir=tmp_path / "out", trustModelCode=True,
                                      options={"sequences": {"steps": 4}})
    summary = json.loads((tmp_path / "out" / "summary.json").read_text(encoding="utf-8"))
    masks = {c["name"]: read_volume(tmp_path / "out" / c["file"]).array for c in summary["classes"]}
    segments = {name: segment_array(results.segmentation, name, nodes[0]) for name in masks}
    for name, mask in masks.items():
        assert np.array_equal(segments[name] > 0, mask > 0), name
    assert ((segments["Tumor core"] > 0) & (segments["Whole tumor"] > 0)).any()  # they overlap in Slicer too
    assert [m.GetName() for m in results.maps] and all("Whole tumor" in m.GetName() for m in results.maps)
    # the panel's "relied on" line: one share per sequence, in the model's order, the shares summing to 1
    shares = sequenceShares(results.summary)
    assert [q.name for q in shares] == ["T1c", "T1", "T2", "FLAIR"]
    assert sum(q.share for q in shares) == pytest.approx(1.0, abs=1e-6)
