"""A ``segxai explain`` output folder -> MRML nodes, and the nodes of one input found again later.

What one run puts into the scene, all tied to the input volume by the node reference
:data:`INPUT_REFERENCE` and marked with the attribute :data:`ROLE_ATTRIBUTE`:

- a segmentation node (segment names and colours from the model card, reference geometry from the
  input, the input's parent transform), with a hidden label colour table that keeps the model's label
  values for export;
- one scalar volume node per map: the input's geometry and parent transform, the colour map and window of
  the map's display (``summary["maps"][n]["display"]``, the colour range of the report's pictures and viewer:
  :mod:`SegXAILib.report.display`) and a threshold that makes low values transparent in the slice views; for
  a signed map the threshold is two-sided (|value| below it transparent, both signs shown) through the map's
  own colour table.

In the subject hierarchy the results sit beside the input, under the input's parent (its study for a
DICOM series, where Slicer's DICOM SEG export looks for them). The input is never modified.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import slicer
import slicer.util
import vtk

from SegXAILib.errors import SegXAIError
from SegXAILib.report.display import map_display
from SegXAILib.volume import read_volume

from .colors import TWO_SIDED_ATTRIBUTE, getColorTable, labelColorTable, twoSidedColorTable

__all__ = ["ExplainResults", "loadResults", "findResults", "resultNodes", "removeResults", "removeNode", "showMap",
           "shownMap", "setMapThreshold", "mapThreshold", "setMapWindow", "mapWindow", "ROLE_ATTRIBUTE",
           "INPUT_REFERENCE", "SUMMARY_ATTRIBUTE"]

ROLE_ATTRIBUTE = "SegXAI.Role"
"""Node attribute: ``segmentation``, ``map`` or ``labels`` (the segmentation's label colour table)."""
INPUT_REFERENCE = "SegXAIInput"
"""Node reference role from each result node to its input volume (kept through save and reload)."""
SUMMARY_ATTRIBUTE = "SegXAI.Summary"
"""Segmentation node attribute: JSON with model, target, classes, case-level scores and maps."""
MAP_ATTRIBUTES = ("method", "variant", "class", "colormap", "threshold", "normalised", "file")
"""summary.json map fields kept as ``SegXAI.<field>`` attributes of each map node."""
SIGNED_THRESHOLD_ATTRIBUTE = "SegXAI.signedThreshold"
"""Map node attribute of a signed map: its two-sided threshold, a fraction of the window's larger end."""
SUMMARY_KEYS = ("model", "target", "classes", "groups", "device", "scores", "not_applicable", "maps", "seconds")
"""The parts of summary.json the panel needs (curves and versions stay in the output folder)."""


@dataclass
class ExplainResults:
    """The nodes one run created for one input."""

    input: Any
    segmentation: Any
    maps: list = field(default_factory=list)
    labelColors: Any = None
    summary: dict = field(default_factory=dict)

    @property
    def nodes(self) -> list:
        """Every node of the run: segmentation, maps, label table."""
        return [n for n in (self.segmentation, *self.maps, self.labelColors) if n is not None]

    def map(self, name: str):
        """The map node whose method (``gradcam``) or ``method-variant`` (``tta-entropy``) is ``name``."""
        for node in self.maps:
            if name in (node.GetAttribute("SegXAI.method"), mapStem(node)):
                return node
        raise KeyError(f"no map {name!r}; have {', '.join(mapStem(n) for n in self.maps)}")


def mapStem(node) -> str:
    """``method`` or ``method-variant`` of a map node, as in the output file name."""
    method, variant = node.GetAttribute("SegXAI.method"), node.GetAttribute("SegXAI.variant")
    return method if not variant else f"{method}-{variant}"


# --------------------------------------------------------------------- finding
def _nodes(scene):
    for index in range(scene.GetNumberOfNodes()):
        yield scene.GetNthNode(index)


def resultNodes(scene, inputNode, role: str | None = None) -> list:
    """Result nodes of ``inputNode`` (of one ``role``, or all), in the order they were added."""
    return [node for node in _nodes(scene)
            if node.GetAttribute(ROLE_ATTRIBUTE) and node.GetNodeReferenceID(INPUT_REFERENCE) == inputNode.GetID()
            and (role is None or node.GetAttribute(ROLE_ATTRIBUTE) == role)]


def findResults(scene, inputNode) -> ExplainResults | None:
    """The results of ``inputNode`` already in the scene (e.g. after loading a saved scene), or ``None``."""
    segmentations = resultNodes(scene, inputNode, "segmentation")
    if not segmentations:
        return None
    segmentation = segmentations[-1]
    labels = resultNodes(scene, inputNode, "labels")
    summary = json.loads(segmentation.GetAttribute(SUMMARY_ATTRIBUTE) or "{}")
    return ExplainResults(inputNode, segmentation, resultNodes(scene, inputNode, "map"),
                          labels[-1] if labels else None, summary)


def removeResults(scene, inputNode, keep=()) -> None:
    """Remove the result nodes of ``inputNode`` (and their display and storage nodes), except ``keep``."""
    keepIDs = {node.GetID() for node in keep}
    for node in resultNodes(scene, inputNode):
        if node.GetID() not in keepIDs:
            removeNode(scene, node)


def removeNode(scene, node) -> None:
    """Remove a node with the display and storage nodes it owns (RemoveNode alone leaves them behind)."""
    owned = []
    if node.IsA("vtkMRMLDisplayableNode"):
        owned += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    if node.IsA("vtkMRMLStorableNode"):
        owned += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
    if node.IsA("vtkMRMLScalarVolumeNode") and node.GetDisplayNode() is not None:
        table = node.GetDisplayNode().GetColorNode()  # a signed map's own table goes with it
        if table is not None and table.GetAttribute(TWO_SIDED_ATTRIBUTE) == node.GetID():
            owned.append(table)
    scene.RemoveNode(node)
    for other in owned:
        if other is not None and scene.IsNodePresent(other):
            scene.RemoveNode(other)


# --------------------------------------------------------------------- loading
def loadResults(scene, inputNode, outDir: str | Path) -> ExplainResults:
    """Create the nodes for the ``segxai explain`` output in ``outDir`` (summary.json and its files).

    Nothing is added unless every file reads and lies on the input's grid: a failure leaves the scene
    as it was.

    Raises:
        SegXAIError: a file is missing or not on the input's grid.
    """
    outDir = Path(outDir)
    summary = json.loads((outDir / "summary.json").read_text(encoding="utf-8"))
    inputMatrix = _ijkToRas(inputNode)
    labels = _readOnInputGrid(outDir / summary["files"]["segmentation"], inputNode, inputMatrix)
    # a multi-label model's classes overlap: one 0/1 file per class, each imported as its own layer
    layers = [_readOnInputGrid(outDir / c["file"], inputNode, inputMatrix) * int(c["label"])
              for c in summary["classes"] if "file" in c] or [labels]
    maps = [(item, _readOnInputGrid(outDir / item["file"], inputNode, inputMatrix)) for item in summary["maps"]]

    inputName = inputNode.GetName()
    created = []
    try:
        table = labelColorTable(scene, f"{inputName}: labels ({summary['model']['name']})", summary["classes"])
        created.append(table)
        segmentation = _segmentationNode(scene, inputNode, layers, table,
                                         f"{inputName}: segmentation ({summary['model']['name']})")
        created.append(segmentation)
        mapNodes = []
        for item, array in maps:
            node = _mapNode(scene, inputNode, array, item, f"{inputName}: {_stem(item)} ({item['class']})")
            created.append(node)
            mapNodes.append(node)
    except BaseException:
        for node in reversed(created):
            removeNode(scene, node)
        raise
    kept = {key: summary[key] for key in SUMMARY_KEYS if key in summary}
    sequences = [e for e in summary.get("explanations") or [] if e.get("method") == "sequences"]
    if sequences:  # small: the panel shows which scan the segmentation relied on
        kept["explanations"] = sequences
    segmentation.SetAttribute(SUMMARY_ATTRIBUTE, json.dumps(kept))
    for node in created:
        node.SetAttribute(ROLE_ATTRIBUTE, "labels" if node is table else "segmentation" if node is segmentation
                          else "map")
        node.SetNodeReferenceID(INPUT_REFERENCE, inputNode.GetID())
    _placeBesideInput(scene, inputNode, [segmentation, *mapNodes])
    return ExplainResults(inputNode, segmentation, mapNodes, table, kept)


def _stem(item: dict) -> str:
    return item["method"] if not item.get("variant") else f"{item['method']}-{item['variant']}"


def _ijkToRas(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def _readOnInputGrid(path: Path, inputNode, inputMatrix: np.ndarray) -> np.ndarray:
    """The voxels of an output file, checked to lie on the input's grid (the command line resamples to it)."""
    if not path.is_file():
        raise SegXAIError(f"the explain output lacks {path.name}; run again (the output folder is incomplete)")
    volume = read_volume(path)
    shape = slicer.util.arrayFromVolume(inputNode).shape
    # Files store geometry in decimal text: allow rounding, far below a voxel.
    tolerance = 1e-4 * max(1.0, float(np.abs(inputMatrix).max()))
    if volume.shape != shape or not np.allclose(volume.ijk_to_ras, inputMatrix, rtol=0, atol=tolerance):
        raise SegXAIError(f"{path.name} is not on the grid of '{inputNode.GetName()}'; "
                          "the output folder belongs to another scan")
    return volume.array


def _segmentationNode(scene, inputNode, layers: list[np.ndarray], table, name: str):
    """A segmentation of the label arrays ``layers``, each imported through a temporary labelmap whose display
    uses ``table``: segments of different layers may overlap (a multi-label model's classes)."""
    # Labelmap, segmentation and input share the input's parent transform first: the reference geometry is
    # then the input's own (not moved into world coordinates) and the import is a copy, not a resampling.
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetAndObserveTransformNodeID(inputNode.GetTransformNodeID())
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(inputNode)
    segmentation.SetLabelmapConversionColorTableNodeID(table.GetID())
    for labels in layers:
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{name} (import)")
        try:
            labelmap.CopyOrientation(inputNode)
            labelmap.SetAndObserveTransformNodeID(inputNode.GetTransformNodeID())
            slicer.util.updateVolumeFromArray(labelmap, np.ascontiguousarray(labels.astype(np.int16)))
            labelmap.CreateDefaultDisplayNodes()
            labelmap.GetDisplayNode().SetAndObserveColorNodeID(table.GetID())
            if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation):
                removeNode(scene, segmentation)
                raise SegXAIError(f"Slicer could not import the segmentation of '{inputNode.GetName()}'")
        finally:
            removeNode(scene, labelmap)
    return segmentation


def _mapNode(scene, inputNode, array: np.ndarray, item: dict, name: str):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.CopyOrientation(inputNode)  # CopyOrientation leaves the parent transform out
    node.SetAndObserveTransformNodeID(inputNode.GetTransformNodeID())
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array.astype(np.float32)))
    node.SetDescription(item.get("description", ""))
    for key in MAP_ATTRIBUTES:
        value = item.get(key)
        node.SetAttribute(f"SegXAI.{key}", "" if value is None else str(value))
    shown = map_display(item, array, slicer.util.arrayFromVolume(inputNode))  # the report's range and colours
    node.SetAttribute("SegXAI.signed", "1" if shown.signed else "")
    node.SetAttribute("SegXAI.display", json.dumps(shown.to_json()))
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(getColorTable(scene, shown.colormap).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(shown.low, shown.high if not shown.constant else shown.low + 1.0)
    display.AutoThresholdOff()
    display.SetApplyThreshold(0 if shown.signed else 1)  # a signed map's threshold is its table's opacity
    setMapThreshold(node, shown.threshold)
    return node


def _isSigned(mapNode) -> bool:
    return bool(mapNode.GetAttribute("SegXAI.signed"))


def _colormapOf(mapNode) -> str:
    """The matplotlib colour map of a map node's display (the summary's display, else its explainer's)."""
    shown = json.loads(mapNode.GetAttribute("SegXAI.display") or "{}")
    return shown.get("colormap") or mapNode.GetAttribute("SegXAI.colormap") or "inferno"


def _placeBesideInput(scene, inputNode, nodes) -> None:
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    inputItem = shNode.GetItemByDataNode(inputNode)
    parent = shNode.GetItemParent(inputItem) if inputItem else shNode.GetSceneItemID()
    referenced = inputNode.GetAttribute("DICOM.instanceUIDs")
    referencesName = slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMReferencedInstanceUIDsAttributeName()
    for node in nodes:
        item = shNode.GetItemByDataNode(node) or shNode.CreateItem(parent, node)
        shNode.SetItemParent(item, parent)
        if referenced and node.IsA("vtkMRMLSegmentationNode"):
            # what Slicer's DICOM SEG exporter reads to find the images the segmentation refers to
            shNode.SetItemAttribute(item, referencesName, referenced)


# -------------------------------------------------------------------- display
def showMap(scene, mapNode, opacity: float | None = None) -> None:
    """Make ``mapNode`` the foreground of every slice view (``None``: no foreground)."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        composite.SetForegroundVolumeID(mapNode.GetID() if mapNode is not None else None)
        if opacity is not None:
            composite.SetForegroundOpacity(opacity)


def shownMap(scene, inputNode):
    """The map of ``inputNode`` shown as foreground in the slice views, or ``None``."""
    maps = {node.GetID(): node for node in resultNodes(scene, inputNode, "map")}
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        foreground = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode").GetForegroundVolumeID()
        if foreground in maps:
            return maps[foreground]
    return None


def mapWindow(mapNode) -> tuple[float, float]:
    display = mapNode.GetDisplayNode()
    return display.GetWindowLevelMin(), display.GetWindowLevelMax()


def setMapWindow(mapNode, low: float, high: float) -> None:
    """Colour range of a map (the colour bar's ends); keeps the threshold's place within it."""
    fraction = mapThreshold(mapNode)
    mapNode.GetDisplayNode().SetWindowLevelMinMax(low, high)
    setMapThreshold(mapNode, fraction)


def mapThreshold(mapNode) -> float:
    """Display threshold as a fraction of the colour range (of its larger end, for a signed map)."""
    if _isSigned(mapNode):
        return float(mapNode.GetAttribute(SIGNED_THRESHOLD_ATTRIBUTE) or 0.0)
    low, high = mapWindow(mapNode)
    return (mapNode.GetDisplayNode().GetLowerThreshold() - low) / (high - low) if high > low else 0.0


def setMapThreshold(mapNode, fraction: float) -> None:
    """Values below ``low + fraction * (high - low)`` of the colour range are transparent; for a signed map,
    values with |value| below ``fraction * max(|low|, |high|)``, whatever their sign."""
    low, high = mapWindow(mapNode)
    if _isSigned(mapNode):
        mapNode.SetAttribute(SIGNED_THRESHOLD_ATTRIBUTE, repr(float(fraction)))
        table = twoSidedColorTable(mapNode.GetScene(), mapNode, _colormapOf(mapNode), low, high,
                                   float(fraction) * max(abs(low), abs(high)))
        mapNode.GetDisplayNode().SetAndObserveColorNodeID(table.GetID())
        return
    upper = max(high, float(np.max(slicer.util.arrayFromVolume(mapNode))))  # nothing above the range is cut
    mapNode.GetDisplayNode().SetThreshold(low + float(fraction) * (high - low), upper)
