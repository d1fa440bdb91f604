"""Pictures for the report: three orthogonal slices through the object, a map over the scan, the SA curve.

Orientation convention (the one 3D Slicer's default slice views use, so the report and Slicer agree):

- axial: seen from the feet; patient's right on the image's left, anterior at the top;
- coronal: seen from the front; patient's right on the image's left, superior at the top;
- sagittal: seen from the patient's left; anterior on the image's left, superior at the top.

Every panel carries the letters R/L, A/P, S/I at its edges. Oblique scans are not resampled: each
index axis is shown along the anatomical axis nearest to it (as ITK-SNAP does), so a 10 degree
tilt stays visible as a tilt of the anatomy. Anisotropic voxels are drawn to their physical
size through the ``aspect`` of each panel.

Drawing uses matplotlib's object API (``Figure`` + Agg canvas), never ``pyplot``: no global
backend is switched (the engine also runs inside Slicer's Python) and no figure outlives its call.
"""

from __future__ import annotations

import itertools
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure, SubFigure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.patheffects import withStroke

from ..errors import SegXAIError
from ..fileio import atomic_write
from ..glossary import map_title
from ..volume import Volume
from .display import MapDisplay, map_display, readable

PLANES = ("axial", "coronal", "sagittal")

EDGE_LETTERS = {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"), "sagittal": ("A", "P", "S", "I")}
"""Patient direction at the (left, right, top, bottom) edge of each panel."""

CONTOUR_COLOUR = "#00e5ff"
"""Outline of the segmented object: cyan is in neither ``inferno`` nor the grey scan, and far from ``viridis``."""

PEAK_COLOUR = "#39ff14"
"""Marker of a map's peak: a bright green, apart from the outline's cyan and the colour maps' ends."""

OVERLAY_ALPHA = 0.65
"""Opacity of a map over the scan: the anatomy stays readable under the colour."""

SCAN_PERCENTILES = (1.0, 99.0)
"""Grey window of the scan: robust to a few very bright or dark voxels."""

DPI = 90

_UNCOLOURED = (128, 128, 128)
"""The colour a model card gives a class that has none; grey labels would vanish on a grey scan."""


# ------------------------------------------------------------------ orientation
@dataclass(frozen=True)
class AnatomicalAxes:
    """How the array axes of a (K, J, I) volume lie along the patient's R, A and S axes.

    Attributes:
        array_axes: for R, A, S in turn, the array axis (0 = K, 1 = J, 2 = I) nearest to it.
        signs: +1 where that array axis runs toward R (A, S), -1 where it runs away from it.
        spacing: voxel size in mm along R, A, S.
    """

    array_axes: tuple[int, int, int]
    signs: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @classmethod
    def of(cls, volume: Volume) -> AnatomicalAxes:
        """The nearest axis-aligned reading of ``volume.direction``.

        The assignment of index axes to R, A, S is the permutation with the largest summed
        |cosine|, so every anatomical axis gets exactly one index axis even at 45 degrees.
        """
        cosines = np.abs(volume.direction)  # [ras axis, index axis (I, J, K)]
        best = max(itertools.permutations(range(3)), key=lambda p: sum(cosines[r, p[r]] for r in range(3)))
        return cls(array_axes=tuple(2 - n for n in best),  # index axis I, J, K = array axis 2, 1, 0
                   signs=tuple(1 if volume.direction[r, n] >= 0 else -1 for r, n in enumerate(best)),
                   spacing=tuple(float(volume.spacing[n]) for n in best))

    def reorient(self, array: np.ndarray) -> np.ndarray:
        """A (K, J, I) array as a view indexed [r, a, s], each index growing toward R, A, S."""
        view = np.transpose(array, self.array_axes)
        return view[tuple(slice(None, None, sign) for sign in self.signs)]

    def point(self, center_ijk: Sequence[float], shape: Sequence[int]) -> tuple[int, int, int]:
        """Index (i, j, k) of a (K, J, I) array of ``shape`` -> nearest index in the reoriented array."""
        kji = np.clip(np.rint(np.asarray(center_ijk, dtype=np.float64)[::-1]), 0, np.asarray(shape) - 1).astype(int)
        return tuple(int(kji[axis]) if sign > 0 else int(shape[axis] - 1 - kji[axis])
                     for axis, sign in zip(self.array_axes, self.signs))

    def aspects(self) -> dict[str, float]:
        """Height / width of one pixel of each plane (matplotlib's ``imshow`` aspect)."""
        r, a, s = self.spacing
        return {"axial": a / r, "coronal": s / r, "sagittal": s / a}


def orthogonal_slices(volume: Volume, center_ijk: Sequence[float]) -> dict[str, np.ndarray]:
    """The axial, coronal and sagittal slices through ``center_ijk`` (i, j, k), in display orientation.

    Returns:
        ``{"axial": (A, R), "coronal": (S, R), "sagittal": (S, A)}`` 2D arrays (rows, columns), with
        row 0 at the top of the picture and column 0 at its left, as in the module's convention.
        Show them with :meth:`AnatomicalAxes.aspects` for physical proportions.
    """
    axes = AnatomicalAxes.of(volume)
    v = axes.reorient(volume.array)
    x, y, z = axes.point(center_ijk, volume.shape)
    # reversing R puts the patient's right on the left; reversing A (S) puts anterior (superior) on top
    return {"axial": v[::-1, ::-1, z].T, "coronal": v[::-1, y, ::-1].T, "sagittal": v[x, ::-1, ::-1].T}


def object_center(labels: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """Centre of the object made of the label ``values`` in ``labels`` (K, J, I), as an index (i, j, k).

    The centre of mass; when it falls outside the object (a crescent, a ring) the nearest object
    voxel instead, so all three slices cut the object. The volume's centre when the object is empty.
    """
    mask = np.isin(labels, list(values))
    if not mask.any():
        return (np.asarray(labels.shape, dtype=np.float64)[::-1] - 1) / 2
    voxels = np.argwhere(mask)  # (n, 3) in k, j, i
    center = voxels.mean(axis=0)
    if not mask[tuple(np.rint(center).astype(int))]:
        center = voxels[np.argmin(((voxels - center) ** 2).sum(axis=1))].astype(np.float64)
    return center[::-1]


# ------------------------------------------------------------------ colours
def scan_window(array: np.ndarray) -> tuple[float, float]:
    """Grey-level window (low, high) of a scan from its finite voxels."""
    finite = array[np.isfinite(array)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(finite, SCAN_PERCENTILES))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def grey_rgb(scan: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """A scan slice as grey RGB float (H, W, 3) in [0, 1] through ``window`` (NaN shown black)."""
    lo, hi = window
    grey = np.clip((np.nan_to_num(scan.astype(np.float64), nan=lo) - lo) / (hi - lo), 0.0, 1.0)
    return np.repeat(grey[..., None], 3, axis=-1)


def blend(scan: np.ndarray, values: np.ndarray, window: tuple[float, float], display: MapDisplay,
          alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """A map over a scan slice: RGB float (H, W, 3) in [0, 1].

    The scan is grey through ``window``; where ``display`` draws the map (past its cutoff; in size, both signs,
    for a signed map) its colour over the display range is laid over the grey with opacity ``alpha``; elsewhere,
    and everywhere when the map is constant (it then says nothing), the pixel stays grey.
    """
    rgb = grey_rgb(scan, window)
    shown = display.shown(values)
    if shown.any():
        normalise = Normalize(display.low, display.high, clip=True)
        colour = colormaps[display.colormap](normalise(np.asarray(values, dtype=np.float64)[shown]))[:, :3]
        rgb[shown] = (1.0 - alpha) * rgb[shown] + alpha * colour
    return rgb


def class_colours(classes: Sequence[dict[str, Any]]) -> dict[int, tuple[float, float, float]]:
    """Label value -> RGB in [0, 1] from the summary's classes (0-255), background left out.

    Classes without a colour of their own on the model card (its default grey) get a ``tab10``
    colour, since grey labels would be invisible on the grey scan.
    """
    palette = colormaps["tab10"].colors
    colours = {}
    for n, item in enumerate(c for c in classes if int(c["label"]) != 0):
        rgb = tuple(int(v) for v in item.get("color", _UNCOLOURED))
        colours[int(item["label"])] = palette[n % len(palette)] if rgb == _UNCOLOURED else tuple(v / 255 for v in rgb)
    return colours


# ------------------------------------------------------------------ figures
def _check_grids(scan: Volume, **others: Volume) -> None:
    for name, volume in others.items():
        if not volume.same_grid(scan, atol=1e-3):
            raise SegXAIError(f"the {name} is not on the scan's grid (shape, spacing, origin or direction differ); "
                              "the report needs the files of one 'segxai explain' run")


def _save(figure: Figure, path: Path) -> Path:
    return atomic_write(Path(path), lambda tmp: figure.savefig(tmp, format="png", dpi=DPI), ".png")


def _plane_panels(container: Figure | SubFigure, title: str, title_size: float) -> dict[str, Any]:
    """One panel per plane in ``container``, titled and marked with patient directions."""
    container.suptitle(title, fontsize=title_size)
    panels = dict(zip(PLANES, container.subplots(1, 3)))
    for plane, ax in panels.items():
        ax.set_title(plane, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        left, right, top, bottom = EDGE_LETTERS[plane]
        for text, x, y, ha, va in ((left, 0.01, 0.5, "left", "center"), (right, 0.99, 0.5, "right", "center"),
                                   (top, 0.5, 0.99, "center", "top"), (bottom, 0.5, 0.01, "center", "bottom")):
            ax.text(x, y, text, transform=ax.transAxes, ha=ha, va=va, color="white", fontsize=9, fontweight="bold",
                    path_effects=[withStroke(linewidth=2, foreground="black")])  # readable on bright anatomy
    return panels


def _three_panels(scan: Volume, title: str) -> tuple[Figure, dict[str, Any], dict[str, float]]:
    """A figure with one panel per plane, titled and marked with patient directions."""
    figure = Figure(figsize=(10, 4.6), layout="constrained")
    return figure, _plane_panels(figure, title, 12), AnatomicalAxes.of(scan).aspects()


def _outline(ax: Any, mask: np.ndarray) -> None:
    """The object's outline on one panel (nothing when the slice misses the object)."""
    if mask.any() and not mask.all():
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=[CONTOUR_COLOUR], linewidths=1.0)


def point_in_slices(volume: Volume, ijk: Sequence[float]) -> dict[str, tuple[int, int]]:
    """Where voxel ``ijk`` (i, j, k) of ``volume``'s grid falls in each of its :func:`orthogonal_slices` through it:
    (row, column) per plane."""
    marker = np.zeros(volume.shape, bool)
    marker[tuple(np.clip(np.rint(np.asarray(ijk, dtype=np.float64)[::-1]), 0, np.asarray(volume.shape) - 1)
                 .astype(int))] = True
    return {plane: tuple(int(v) for v in np.argwhere(picture)[0])
            for plane, picture in orthogonal_slices(volume.with_array(marker), ijk).items()}


def render_map_montage(scan: Volume, target_mask: Volume, map_volume: Volume, map_meta: dict[str, Any],
                       center: Sequence[float], path: Path, window: tuple[float, float] | None = None) -> Path:
    """One PNG: the map over the scan on three planes through ``center`` (i, j, k) and three through the map's
    peak inside the head, the object's outline, the peak marked, and a colour bar that says its range and rule.

    Args:
        scan: the scan; ``target_mask`` (the segmented target, bool) and ``map_volume`` on its grid.
        map_meta: the map's entry of ``summary.json`` ("method", "variant", "class", "description",
            "colormap", "threshold", "display"; without "display" it is computed by :mod:`.display`'s rule).
        window: grey window of the scan (default :func:`scan_window`); pass it to share it between figures.
    """
    _check_grids(scan, segmentation=target_mask, map=map_volume)
    window = window or scan_window(scan.array)
    display = map_display(map_meta, map_volume.array, scan.array)
    peak, peak_value = display.peak, display.peak_value
    unit = f" {display.unit}" if display.unit else ""
    target = map_meta.get("class") or "object"
    name = map_title(map_meta["method"], map_meta.get("variant"))
    figure = Figure(figsize=(10, 9.4), layout="constrained")
    figure.suptitle(f"{name}: {target}", fontsize=13)
    aspects = AnatomicalAxes.of(scan).aspects()
    rows = {
        "centre": (center, f"Slices through the centre of the segmented {target} (outlined in cyan)"),
        "peak": (peak, f"Slices through the map's peak inside the head (green cross): {readable(peak_value)}{unit} "
                       f"at voxel (i, j, k) = ({', '.join(f'{v:.0f}' for v in peak)})"),
    }
    axes = []
    for row, (place, (point, title)) in zip(figure.subfigures(2, 1), rows.items()):
        panels = _plane_panels(row, title, 11)
        scans, masks, values = (orthogonal_slices(v, point) for v in (scan, target_mask, map_volume))
        marks = point_in_slices(scan, point) if place == "peak" else {}
        for plane, ax in panels.items():
            ax.imshow(blend(scans[plane], values[plane], window, display), aspect=aspects[plane])
            _outline(ax, masks[plane])
            if plane in marks:
                ax.plot(marks[plane][1], marks[plane][0], "+", color=PEAK_COLOUR, markersize=22, markeredgewidth=2.5,
                        path_effects=[withStroke(linewidth=5, foreground="black")])
        axes.append(panels)

    normalise = Normalize(display.low, display.high if not display.constant else display.low + 1.0)
    bar = row.colorbar(ScalarMappable(normalise, colormaps[display.colormap]), ax=list(axes[-1].values()),
                       orientation="horizontal", fraction=0.07, aspect=50)
    description = str(map_meta.get("description", "")).rstrip(".")
    bar.set_label(textwrap.fill(f"{description}. Colour bar: {display.caption()}.", 120), fontsize=10)
    bar.ax.tick_params(labelsize=9)
    return _save(figure, path)


def render_segmentation_montage(scan: Volume, segmentation: Volume, classes: Sequence[dict[str, Any]],
                                center: Sequence[float], path: Path, target_labels: Sequence[int] = (),
                                window: tuple[float, float] | None = None) -> Path:
    """One PNG: the label map in the class colours over the scan, the target outlined."""
    _check_grids(scan, segmentation=segmentation)
    window = window or scan_window(scan.array)
    colours = class_colours(classes)
    figure, panels, aspects = _three_panels(scan, "segmentation")
    scans, labels = orthogonal_slices(scan, center), orthogonal_slices(segmentation, center)
    for plane, ax in panels.items():
        rgb = grey_rgb(scans[plane], window)
        for value, colour in colours.items():
            where = labels[plane] == value
            rgb[where] = (1 - OVERLAY_ALPHA) * rgb[where] + OVERLAY_ALPHA * np.asarray(colour)
        ax.imshow(rgb, aspect=aspects[plane])
        if target_labels:
            _outline(ax, np.isin(labels[plane], list(target_labels)))
    names = {int(c["label"]): c["name"] for c in classes}
    handles = [Patch(color=colour, label=names[value]) for value, colour in colours.items()]
    if target_labels:
        handles.append(Line2D([], [], color=CONTOUR_COLOUR, label="outline of the target"))
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize=8, frameon=False)
    return _save(figure, path)


def render_thumbnail(scan: Volume, segmentation: Volume, target_labels: Sequence[int], path: Path,
                     inches: float = 1.8) -> Path:
    """A small PNG for a cohort table: the axial slice through the object's centre, its outline in cyan.

    The slice and the grey window are those of the report (:func:`object_center`, :func:`scan_window`);
    no letters or legend, which would not be legible at this size.
    """
    _check_grids(scan, segmentation=segmentation)
    center = object_center(segmentation.array, target_labels)
    axial = orthogonal_slices(scan, center)["axial"]
    mask = np.isin(orthogonal_slices(segmentation, center)["axial"], list(target_labels))
    figure = Figure(figsize=(inches, inches))
    ax = figure.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_axis_off()
    ax.imshow(grey_rgb(axial, scan_window(scan.array)), aspect=AnatomicalAxes.of(scan).aspects()["axial"])
    _outline(ax, mask)
    return _save(figure, path)


def stage_names(curve: Sequence[dict[str, Any]], network_grid: Sequence[int] | None = None,
                spacing_mm: Sequence[float] | None = None) -> list[str]:
    """A reader's name for each layer of an SA curve (forward order), from the grids the layers work on.

    A point's own ``title`` (a reader's name given by the explainer) wins. Otherwise the layers on the coarsest
    grid are the "bottleneck"; those before it "encoder stage 1, 2, ...", those after it "decoder stage 1, 2, ..."
    (the last one "last decoder stage"), numbered in forward order; a layer without a ``shape`` keeps its module
    name. Several layers on the coarsest grid: the first, which reached it by downsampling, is the encoder's
    last stage, the others the bottleneck. With the ``network_grid`` (voxels, array order K, J, I, as the
    layers' ``shape``) and its ``spacing_mm`` (i, j, k), each name says its voxel size
    ("decoder stage 2, 3 mm grid").
    """
    voxels = [int(np.prod(point["shape"])) if point.get("shape") else None for point in curve]
    known = [n for n, v in enumerate(voxels) if v is not None]
    if not known:
        return [str(point.get("title") or point["layer"]) for point in curve]
    coarsest = [n for n in known if voxels[n] == min(voxels[m] for m in known)]
    # the first layer to reach the coarsest grid got there by downsampling: the encoder's last stage
    bottleneck = coarsest[1:] or coarsest
    decoder = [n for n in known if n > bottleneck[-1]]
    names = []
    for n, point in enumerate(curve):
        if point.get("title"):
            names.append(str(point["title"]))
            continue
        if voxels[n] is None:
            names.append(str(point["layer"]))
            continue
        if n in bottleneck:
            name = "bottleneck"
        elif n < bottleneck[0]:
            name = f"encoder stage {len([m for m in known if m <= n])}"
        else:
            name = "last decoder stage" if n == decoder[-1] else f"decoder stage {decoder.index(n) + 1}"
        if network_grid is not None and spacing_mm is not None:
            # the layer's grid covers the network's input grid: its voxels are that many times larger
            size = float(np.mean([s * g / max(int(d), 1) for s, g, d in
                                  zip(spacing_mm, network_grid[::-1], point["shape"][::-1])]))
            name += f", {readable(size)} mm grid"
        names.append(name)
    return names


def render_sa_curve(curve: Sequence[dict[str, Any]], path: Path, reference: str = "model",
                    review_below: float | None = None, network_grid: Sequence[int] | None = None,
                    spacing_mm: Sequence[float] | None = None) -> Path:
    """Line plot of the per-layer SA score (``[{"layer", "sa", "shape"?, "output"?, "title"?}]``, forward order).

    The layers are named by :func:`stage_names`; the legend sits below the plot, off the curve.

    Args:
        reference: what the SA score compares with: ``model`` (the model's own mask) or ``label``.
        review_below: draw the case-level review threshold of the mean SA score as a dashed line.
        network_grid, spacing_mm: the grid the network ran on (voxels K, J, I; mm along i, j, k), for the layers'
            voxel sizes
            (ProtoSeg's ``metadata["network_grid"]`` and the summary's ``model_grid["spacing_mm"]``).
    """
    names = stage_names(curve, network_grid, spacing_mm)
    scores = [float(point["sa"]) for point in curve]
    x = np.arange(len(scores))
    figure = Figure(figsize=(min(12.0, max(7.5, 0.9 * len(scores) + 3)), 5.2), layout="constrained")
    ax = figure.subplots()
    ax.plot(x, scores, "-o", color="#1f5fa8", markersize=5, label="SA score of the layer's features")
    for n, score in enumerate(scores):
        ax.annotate(f"{score:.2f}", (x[n], score), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=9)
    output = [n for n, point in enumerate(curve) if point.get("output")]
    if output:
        ax.plot(x[output], np.asarray(scores)[output], "s", markerfacecolor="none", color="#d62728", markersize=9,
                label="output layer (the prediction itself)")
    if review_below is not None:
        ax.axhline(review_below, color="grey", linestyle="--", linewidth=1,
                   label=f"review threshold of the mean SA score ({review_below:.2f})")
    ax.set_ylim(0, 1.05)
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=10)
    ax.set_xlabel("layer of the network, from the input (left) to the output (right)", fontsize=10)
    ax.set_ylabel("SA score (Dice, 0 to 1)", fontsize=10)
    ax.tick_params(axis="y", labelsize=9)
    against = "the ground truth" if reference == "label" else "the model's own segmentation"
    ax.set_title(f"Segmentation ability per layer (ProtoSeg), against {against}", fontsize=12)
    ax.grid(alpha=0.3)
    figure.legend(loc="outside lower center", ncols=3, fontsize=9, frameon=False)
    return _save(figure, path)


def render_sequence_shares(sequences: Sequence[str], shares: dict[str, Sequence[float]], path: Path,
                           target: str) -> Path:
    """Bars: each input sequence's share of what drove the target's segmentation, by method (``shares``: method
    words -> one share per sequence, each list summing to 1 or all 0)."""
    figure = Figure(figsize=(max(6.0, 1.4 * len(sequences) + 2.5), 4.2), layout="constrained")
    ax = figure.subplots()
    width = 0.8 / max(1, len(shares))
    x = np.arange(len(sequences))
    for n, (words, values) in enumerate(shares.items()):
        bars = ax.bar(x + (n - (len(shares) - 1) / 2) * width, values, width, label=words)
        ax.bar_label(bars, labels=[f"{100 * v:.0f} %" for v in values], fontsize=9, padding=2)
    ax.set_xticks(x, list(sequences), fontsize=11)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("share (all sequences together: 100 %)", fontsize=10)
    ax.set_title(f"Which scan the {target} segmentation relied on", fontsize=12)
    ax.grid(alpha=0.3, axis="y")
    figure.legend(loc="outside lower center", ncols=2, fontsize=9, frameon=False)
    return _save(figure, path)
