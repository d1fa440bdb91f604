"""Colour tables: perceptual tables for explanation maps, and the label table of a segmentation.

Maps use the colour map their explainer names (``inferno`` for saliency, ``viridis`` for uncertainty).
Slicer ships these as file tables whose node IDs are fixed (``vtkMRMLColorTableNodeFileInferno.txt``).
When the scene lacks one (slicer-core has no colour files), an equal table is built from matplotlib
with the same singleton tag, so it gets the same node ID and is not saved with the scene: a scene
written here refers to the table real Slicer already has.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import slicer

from SegXAILib.errors import SegXAIError

__all__ = ["colorTableNodeID", "getColorTable", "labelColorTable", "twoSidedColorTable", "TWO_SIDED_ATTRIBUTE"]

SLICER_FILE_TABLES = {"inferno": "Inferno", "viridis": "Viridis", "magma": "Magma", "plasma": "Plasma",
                      "cividis": "Cividis"}
"""matplotlib colour map name -> Slicer's colour file stem (Libs/MRML/Core/Resources/ColorFiles)."""

TABLE_SIZE = 256

TWO_SIDED_ATTRIBUTE = "SegXAI.TwoSidedFor"
"""Attribute of a map's own two-sided colour table: the ID of the map node it belongs to."""


def _stem(colormap: str) -> str:
    return SLICER_FILE_TABLES.get(colormap.lower(), colormap)


def colorTableNodeID(colormap: str) -> str:
    """The node ID Slicer gives its file colour table ``colormap`` (also ours, when built here)."""
    return f"vtkMRMLColorTableNodeFile{_stem(colormap)}.txt"


def getColorTable(scene, colormap: str = "inferno"):
    """Slicer's colour table for a matplotlib colour map name, added to ``scene`` when missing.

    Raises:
        SegXAIError: neither Slicer nor matplotlib knows the name.
    """
    node = scene.GetNodeByID(colorTableNodeID(colormap))
    if node is not None:
        return node
    import matplotlib

    try:
        cmap = matplotlib.colormaps[colormap.lower() if colormap.lower() in SLICER_FILE_TABLES else colormap]
    except KeyError:
        raise SegXAIError(f"unknown colour map {colormap!r}; use inferno, viridis or another matplotlib name") from None
    node = slicer.vtkMRMLColorTableNode()
    node.SetTypeToFile()
    node.SetSingletonTag(f"File{_stem(colormap)}.txt")  # -> Slicer's own node ID
    node.SetName(_stem(colormap))
    node.SetNumberOfColors(TABLE_SIZE)
    for index, rgba in enumerate(cmap(np.linspace(0.0, 1.0, TABLE_SIZE))):
        node.SetColor(index, *map(float, rgba))
    # Slicer has the five perceptual tables itself; any other name must travel with the scene.
    node.SetSaveWithScene(colormap.lower() not in SLICER_FILE_TABLES)
    scene.AddNode(node)
    return node


def labelColorTable(scene, name: str, classes: Sequence[dict]):
    """A colour table whose entry ``label`` is the class named ``name`` in the class's colour.

    ``classes`` are summary.json entries ``{"name", "label", "color": [r, g, b] (0..255)}``. Importing a
    labelmap whose display uses this table names and colours the segments; exporting with it writes the
    model's own label values (e.g. 4 for enhancing tumour), not 1..N.
    """
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    node.SetTypeToUser()
    node.SetNumberOfColors(max(int(c["label"]) for c in classes) + 1)
    node.SetHideFromEditors(True)  # an implementation detail of the segmentation, not a layer to pick
    for c in classes:
        r, g, b = (float(v) / 255.0 for v in c["color"])
        node.SetColor(int(c["label"]), str(c["name"]), r, g, b, 0.0 if int(c["label"]) == 0 else 1.0)
    return node


def twoSidedColorTable(scene, mapNode, colormap: str, low: float, high: float, hidden: float):
    """``mapNode``'s own colour table over its window ``low``..``high``: ``colormap``'s colours, transparent where
    |value| < ``hidden`` (Slicer's slice views honour a table's opacity), so a signed map shows both signs past
    a two-sided threshold. Made once per map, then updated in place.
    """
    import matplotlib

    display = mapNode.GetDisplayNode()
    node = display.GetColorNode() if display is not None else None
    if node is None or node.GetAttribute(TWO_SIDED_ATTRIBUTE) != mapNode.GetID():
        node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", f"{mapNode.GetName()}: colours")
        node.SetTypeToUser()
        node.SetNumberOfColors(TABLE_SIZE)
        node.SetHideFromEditors(True)  # belongs to one map, not a table to pick for another
        node.SetAttribute(TWO_SIDED_ATTRIBUTE, mapNode.GetID())
    values = np.linspace(low, high, TABLE_SIZE)
    for index, (value, rgba) in enumerate(zip(values, matplotlib.colormaps[colormap](np.linspace(0, 1, TABLE_SIZE)))):
        node.SetColor(index, "", *map(float, rgba[:3]), 0.0 if abs(value) < hidden else 1.0)
    return node
