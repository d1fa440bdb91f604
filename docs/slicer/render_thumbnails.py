"""Render the README's slice-view thumbnails exactly as Slicer's slice views show them.

Runs the module's logic (the same ``segxai explain`` child process as the panel) on a synthetic tumour
placed in a sample brain MRI, then blends the layers with ``vtkMRMLSliceLogic`` (no screen, no Qt) and
writes PNG files with ``vtkPNGWriter``:

    slice_segmentation.png   the scan with the segmentation as a label layer (outlines)
    slice_<layer>.png        the scan, an explanation layer as foreground, the segmentation outlines
    slice_views.png          the three side by side

Needs slicer-core (``pip install -e ".[slicer-core]"``)::

    python docs/slicer/render_thumbnails.py                     # bundled model brain-lesion-unet
    python docs/slicer/render_thumbnails.py --model card.json --layers gradcam,tta-entropy
    python docs/slicer/render_thumbnails.py --tiny              # untrained tiny U-Net: tries the script only
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "SegXAI"))  # SegXAILogic, as Slicer finds it beside SegXAI.py

import slicer  # noqa: E402
import vtk  # noqa: E402
from vtk.util.numpy_support import numpy_to_vtk, vtk_to_numpy  # noqa: E402

from SegXAILib.data.lesion import synthesize_lesion  # noqa: E402
from SegXAILib.data.samples import load_host  # noqa: E402
from SegXAILib.preprocessing import resample_to_grid  # noqa: E402
from SegXAILib.volume import Volume  # noqa: E402
from SegXAILogic import ExplainLogic, showMap, updateNodeFromVolume  # noqa: E402
from SegXAILogic.standalone import standaloneScene  # noqa: E402


def tiny_case(host: Volume, spacing: float = 4.0) -> Volume:
    """The host on a coarse grid over the same field of view, so an untrained tiny U-Net runs in seconds."""
    size = np.array(host.shape[::-1]) * host.spacing
    shape = tuple(int(s) for s in np.ceil(size / spacing)[::-1])
    return resample_to_grid(host, Volume(np.zeros(shape, np.float32), [spacing] * 3, host.origin, host.direction))


def tiny_model(folder: Path) -> Path:
    from SegXAILib.tests.conftest import make_card  # the tests' tiny random U-Net (needs pytest)

    return make_card(folder, spacing=(4.0, 4.0, 4.0))


def rgba(sliceLogic) -> np.ndarray:
    """The slice view's blended image, (H, W, 4) uint8, first row at the bottom as VTK stores it."""
    connection = sliceLogic.GetImageDataConnection()
    connection.GetProducer().Update()
    image = connection.GetProducer().GetOutputDataObject(connection.GetIndex())
    width, height, _ = image.GetDimensions()
    return vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1).copy()


def write_png(array: np.ndarray, path: Path) -> Path:
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[1], array.shape[0], 1)
    image.GetPointData().SetScalars(numpy_to_vtk(array.reshape(-1, array.shape[2]), deep=True,
                                                 array_type=vtk.VTK_UNSIGNED_CHAR))
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputData(image)
    writer.Write()
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="brain-lesion-unet", help="name, card .json or MONAI bundle folder")
    parser.add_argument("--methods", default="gradcam,tta")
    parser.add_argument("--layers", default="gradcam,tta-entropy", help="the two maps to show, method[-variant]")
    parser.add_argument("--host", default="mni152")
    parser.add_argument("--seed", type=int, default=20001)
    parser.add_argument("--size", type=int, default=320, help="thumbnail width and height in pixels")
    parser.add_argument("--fov", type=float, default=120.0, help="field of view in mm (0: the whole scan)")
    parser.add_argument("--opacity", type=float, default=0.6)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true", help="untrained tiny U-Net on a 4 mm grid")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    env = standaloneScene(viewSize=args.size)
    scene, sliceLogic = env.scene, env.sliceLogic
    host = load_host(args.host)
    case = synthesize_lesion(tiny_case(host) if args.tiny else host, seed=args.seed)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{args.host} with tumour {args.seed}")
    updateNodeFromVolume(node, case.image)
    node.CreateDefaultDisplayNodes()

    stages = []

    def report(event) -> None:
        if event.stage not in stages:
            stages.append(event.stage)
            print(event.stage, flush=True)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="segxai-thumbnails-") as work:
        model = str(tiny_model(Path(work))) if args.tiny else args.model
        results = ExplainLogic(scene).run(node, model, args.methods, device=args.device, onProgress=report)
    print(f"explained with {results.summary['model']['name']} on {results.summary['device']} "
          f"in {time.perf_counter() - start:.0f} s")

    # The segmentation as a label layer: Slicer draws segmentations with its own displayable manager,
    # the slice logic blends volumes, so the thumbnails show the exported labelmap (outlines) instead.
    labels = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "segmentation labels")
    slicer.vtkSlicerSegmentationsModuleLogic.ExportAllSegmentsToLabelmapNode(
        results.segmentation, labels, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    composite, sliceNode = sliceLogic.GetSliceCompositeNode(), sliceLogic.GetSliceNode()
    composite.SetBackgroundVolumeID(node.GetID())
    composite.SetLabelVolumeID(labels.GetID())
    composite.SetLabelOpacity(1.0)
    sliceNode.SetUseLabelOutline(True)
    sliceNode.RotateToVolumePlane(node)
    sliceLogic.FitSliceToBackground()
    sliceNode.JumpSliceByCentering(*case.center_ras)  # the tumour's centre in the middle of the view
    if args.fov:
        sliceNode.SetFieldOfView(args.fov, args.fov, sliceNode.GetFieldOfView()[2])

    panels = {"segmentation": None, **{name: results.map(name) for name in args.layers.split(",")}}
    images = []
    for name, layer in panels.items():
        showMap(scene, layer, args.opacity)
        images.append(rgba(sliceLogic))
        print("wrote", write_png(images[-1], out / f"slice_{name}.png"))
    gap = np.full((images[0].shape[0], 6, 4), 255, np.uint8)
    strip = np.concatenate([part for image in images for part in (image, gap)][:-1], axis=1)
    print("wrote", write_png(strip, out / "slice_views.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
