"""A case in a Jupyter notebook: the scan, the segmentation and every map in one NiiVue viewer.

``case.show()`` (:meth:`SegXAILib.case.CaseResult.show`) returns an ``ipyniivue.NiiVue`` widget, which the
notebook draws when it is a cell's last value. ipyniivue is an optional extra (``pip install
'segxai[notebook]'``), imported only here and only when a case is shown, so SegXAILib imports without it.

What the widget holds, all on the scan's grid and in memory (nothing is written to disk):

- the scan, exact (its own voxel type), grey through the report's window;
- the segmentation, exact, coloured by the model card's classes (their names shown under the cursor);
- each map exactly as ``segxai explain`` writes it (:func:`SegXAILib.outputs.map_on_scan`: float32, min-max
  scaled when the map has no units), coloured as in the report (:mod:`SegXAILib.report.display`: the same
  colour range, colour map and threshold); the first map is shown, the others have opacity 0
  (``viewer.volumes[n].opacity = 0.65`` shows one).

Volumes reach ipyniivue as gzipped NIfTI bytes (``Volume(data=..., name=...)``); NiiVue reads the format from
the name, hence names ending in ``.nii.gz``: those of the files ``segxai explain`` writes.

Colours: NiiVue spreads a layer's colour map over ``cal_min`` to ``cal_max`` (the display range) and draws the
values below it in the first colour, above it in the last. Each map gets a colour map of its own,
``segxai-<its volume's id>``: the matplotlib colours of its montage, with the entries of the values its
threshold hides transparent (for a signed map, a band around 0). NiiVue learns a colour map by a message, which
a widget not yet in the page would miss, so these are sent when the page reports the canvas attached; until
then a map is drawn in NiiVue's own colour map of that name (``inferno``, ``viridis``), or grey.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import SegXAIError
from .explain.pipeline import ExplainResult
from .models.card import ModelCard
from .outputs import map_entry, map_on_scan, map_stem
from .report.display import MapDisplay, display_range, head_mask
from .report.montage import OVERLAY_ALPHA, scan_window
from .report.viewer import colormap_rgb, encode_labels, label_lut, nifti_gz

INSTALL_HINT = "pip install 'segxai[notebook]'"

VIEWER_OPTIONS: dict[str, Any] = {
    "is_colorbar": True, "is_radiological_convention": True, "sagittal_nose_left": True,
    "show_3d_crosshair": False}
"""NiiVue options: oriented as the report's pictures and viewer (patient's right on the left)."""


def import_ipyniivue() -> Any:
    """The ``ipyniivue`` module; without it one line that says how to install it."""
    try:
        import ipyniivue
    except ImportError:
        raise SegXAIError(f"showing a case in a notebook needs ipyniivue: {INSTALL_HINT}") from None
    return ipyniivue


def calibration(display: MapDisplay) -> tuple[float, float]:
    """NiiVue's ``cal_min``, ``cal_max`` of a map: its display range (one unit wide for a constant map)."""
    return display.low, display.high if display.high > display.low else display.low + 1.0


def layer_colours(display: MapDisplay) -> dict[str, list[int]]:
    """A map's NiiVue colour map: 256 entries over :func:`calibration`'s range with the colours of its
    montage (:func:`~SegXAILib.report.viewer.colormap_rgb`), those of values its threshold hides transparent."""
    rgb = np.asarray(colormap_rgb(display.colormap))
    alpha = np.where(display.shown(np.linspace(*calibration(display), 256)), 255, 0)
    return {"R": rgb[:, 0].tolist(), "G": rgb[:, 1].tolist(), "B": rgb[:, 2].tolist(), "A": alpha.tolist(),
            "I": list(range(256))}


def send_colours(viewer: Any, colours: dict[str, dict[str, list[int]]], colormaps: dict[str, str]) -> None:
    """Once ``viewer``'s canvas is in the page, give it ``colours`` (NiiVue name -> colour map) and switch each
    volume named in ``colormaps`` (volume id -> colour map name) to its own."""
    def send() -> None:
        for name, table in colours.items():
            viewer.add_colormap(name, table)
        for volume in viewer.volumes:
            if volume.id in colormaps:
                volume.colormap = colormaps[volume.id]

    viewer.on_canvas_attached(send)


def show_case(run: ExplainResult, card: ModelCard, height: int = 480) -> Any:
    """An ``ipyniivue.NiiVue`` widget of a case: scan, segmentation and each map (see the module).

    Args:
        run: the segmentation and explanations (:class:`SegXAILib.case.CaseResult`'s ``run``).
        card: the model's card (its classes name and colour the labels).
        height: of the widget, in pixels.

    Raises:
        SegXAIError: ipyniivue is not installed (one line naming the install command).
    """
    ipyniivue = import_ipyniivue()
    result = run.segmentation
    viewer = ipyniivue.NiiVue(height=height, **VIEWER_OPTIONS)
    shipped = set(viewer.colormaps())
    low, high = scan_window(result.scan.array)
    segmentation = ipyniivue.Volume(data=encode_labels(result.labels), name="segmentation.nii.gz",
                                    opacity=OVERLAY_ALPHA, colorbar_visible=False)
    segmentation.set_colormap_label(label_lut([{"name": c.name, "label": c.label, "color": list(c.color)}
                                               for c in card.classes]))
    volumes = [ipyniivue.Volume(data=nifti_gz(result.scan.array, result.scan.ijk_to_ras), name="scan.nii.gz",
                                colormap="gray", cal_min=low, cal_max=high, colorbar_visible=False), segmentation]
    head = head_mask(result.scan.array)
    colours: dict[str, dict[str, list[int]]] = {}
    colormaps: dict[str, str] = {}
    for explanation in run.explanations:
        for item in explanation.maps:
            volume = map_on_scan(item, result)
            display = display_range(volume.array, head, map_entry(explanation.method, item, run.target))
            cal_min, cal_max = calibration(display)
            layer = ipyniivue.Volume(
                data=nifti_gz(volume.array, volume.ijk_to_ras), name=f"{map_stem(item, run.target)}.nii.gz",
                colormap=display.colormap.lower() if display.colormap.lower() in shipped else "gray",
                cal_min=cal_min, cal_max=cal_max, opacity=OVERLAY_ALPHA if len(volumes) == 2 else 0.0)
            name = f"segxai-{layer.id}"  # one per layer and widget: two cases shown on a page keep their colours
            colours[name], colormaps[layer.id] = layer_colours(display), name
            volumes.append(layer)
            del volume  # one scan-sized float map at a time besides its compressed copy
    viewer.load_volumes(volumes)
    send_colours(viewer, colours, colormaps)
    return viewer
