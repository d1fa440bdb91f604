"""A scene with the logics Slicer's application would give it, for using this package without Slicer.

With slicer-core (``pip install slicer-core``) the MRML scene, volume reading, colour tables and the slice
views' layer blending all work without Qt: the tests, and the script that renders the README's slice-view
thumbnails, run the module's logic on such a scene. Inside Slicer use ``slicer.mrmlScene`` instead.
"""

from __future__ import annotations

from types import SimpleNamespace

import slicer
import vtk

__all__ = ["standaloneScene"]


def standaloneScene(viewSize: int = 0) -> SimpleNamespace:
    """A new scene (also made ``slicer.mrmlScene``) with colour, volume and slice logics.

    Returns a namespace with ``scene``, ``app`` (the application logic), ``volumes`` (volume reading) and
    ``sliceLogic``, the logic of a "Red" slice view whose ``GetImageDataConnection()`` gives the blended
    RGBA image Slicer would show (``viewSize``: its width and height in pixels, if not 0).
    """
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    colors = app.GetColorLogic()
    colors.SetMRMLScene(scene)  # adds Slicer's built-in colour tables (not the file-based ones)
    app.SetModuleLogic("Colors", colors)
    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLScene(scene)
    volumes.SetMRMLApplicationLogic(app)
    app.SetModuleLogic("Volumes", volumes)
    app.SetSliceLogics(vtk.vtkCollection())
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)
    sliceLogic = slicer.vtkMRMLSliceLogic()
    sliceLogic.SetMRMLApplicationLogic(app)
    sliceLogic.SetMRMLScene(scene)
    app.GetSliceLogics().AddItem(sliceLogic)
    sliceLogic.AddSliceNode("Red").SetOrientation("Axial")
    if viewSize:
        sliceLogic.ResizeSliceNode(viewSize, viewSize)
    return SimpleNamespace(scene=scene, app=app, volumes=volumes, sliceLogic=sliceLogic)
