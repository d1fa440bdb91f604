"""Writing results out: the segmentation as a labelmap file or DICOM SEG, the whole scene as .mrb."""

from __future__ import annotations

import os
from pathlib import Path

import slicer
import vtk

from SegXAILib.errors import SegXAIError

__all__ = ["LABELMAP_SUFFIXES", "exportSegmentationToFile", "cameFromDicom", "exportDicomSeg", "saveSceneBundle"]

LABELMAP_SUFFIXES = (".nrrd", ".nii.gz", ".nii", ".seg.nrrd")


def exportSegmentationToFile(segmentationNode, referenceVolumeNode, path: str | os.PathLike) -> Path:
    """Write the segmentation as one labelmap file on the reference volume's grid, in its local coordinates.

    Voxels hold the model's label values (the segmentation's label colour table maps segment names to
    them), so the file equals the command line's ``segmentation.nii.gz``. ``.nrrd``, ``.nii`` or ``.nii.gz``.
    """
    path = Path(path)
    if not path.name.endswith(LABELMAP_SUFFIXES):
        raise SegXAIError(f"cannot write a labelmap as {path.name}; use a .nrrd, .nii or .nii.gz file name")
    scene = segmentationNode.GetScene()
    segmentation = segmentationNode.GetSegmentation()
    segmentIDs = vtk.vtkStringArray()
    for index in range(segmentation.GetNumberOfSegments()):
        segmentIDs.InsertNextValue(segmentation.GetNthSegmentID(index))
    before = _nodeIDs(scene)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{segmentationNode.GetName()} (export)")
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentationNode, segmentIDs, labelmap, referenceVolumeNode,
            slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY,
            segmentationNode.GetLabelmapConversionColorTableNode())
        if not ok:
            raise SegXAIError(f"Slicer could not export '{segmentationNode.GetName()}' to a labelmap")
        # The labelmap inherits the segmentation's parent transform; the file keeps local coordinates
        # like the input's own file.
        labelmap.SetAndObserveTransformNodeID(None)
        storage = labelmap.CreateDefaultStorageNode()
        storage.SetFileName(str(path))
        storage.SetUseCompression(1)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not storage.WriteData(labelmap):
            raise SegXAIError(f"could not write {path}; check the folder exists and is writable")
    finally:
        # the labelmap, its display node and the colour table Slicer's export makes for it
        for nodeID in reversed([i for i in _nodeIDs(scene) if i not in before]):
            scene.RemoveNode(scene.GetNodeByID(nodeID))
    return path


def _nodeIDs(scene) -> list[str]:
    return [scene.GetNthNode(index).GetID() for index in range(scene.GetNumberOfNodes())]


def cameFromDicom(volumeNode) -> bool:
    """Whether the volume was loaded from Slicer's DICOM database (then DICOM SEG export is offered)."""
    return bool(volumeNode is not None and volumeNode.GetAttribute("DICOM.instanceUIDs"))


def exportDicomSeg(segmentationNode, outputDir: str | os.PathLike) -> list[Path]:
    """Write the segmentation as a DICOM SEG object referring to its input's DICOM series.

    Needs the Slicer application with its DICOM SEG plugin (core in Slicer 5.12; the
    QuantitativeReporting extension before that) and an input loaded from the DICOM database.
    """
    try:
        import DICOMSegmentationPlugin
    except ImportError:
        raise SegXAIError("DICOM SEG export needs Slicer 5.12 or later, or the QuantitativeReporting extension "
                          "in earlier versions") from None
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(segmentationNode.GetScene())
    exporter = DICOMSegmentationPlugin.DICOMSegmentationPluginClass()
    exportables = exporter.examineForExport(shNode.GetItemByDataNode(segmentationNode))
    if not exportables:
        raise SegXAIError("the segmentation cannot be written as DICOM SEG: its input was not loaded from the "
                          "DICOM database (export a labelmap file instead)")
    outputDir = Path(outputDir)
    outputDir.mkdir(parents=True, exist_ok=True)
    before = set(outputDir.glob("*.dcm"))
    for exportable in exportables:
        exportable.directory = str(outputDir)
    error = exporter.export(exportables)
    if error:
        raise SegXAIError(f"DICOM SEG export failed: {error}")
    return sorted(set(outputDir.glob("*.dcm")) - before)


def saveSceneBundle(scene, path: str | os.PathLike) -> Path:
    """Save the whole scene, data included, as one Medical Reality Bundle (.mrb) file."""
    path = Path(path)
    if path.suffix.lower() != ".mrb":
        raise SegXAIError(f"a scene bundle file name ends with .mrb, not {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not scene.WriteToMRB(str(path)):  # a str: VTK's wrapper crashes on None or a Path
        raise SegXAIError(f"could not save the scene to {path}; check the folder is writable and has space")
    return path
