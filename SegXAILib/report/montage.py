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
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.patheffects import withStroke

from ..errors import SegXAIError
from ..fileio import atomic_write
from ..volume import Volume

PLANES = ("axial", "coronal", "sagittal")

EDGE_LETTERS = {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"), "sagittal": ("A", "P", "S", "I")}
"""Patient direction at the (left, right, top, bottom) edge of each panel."""

CONTOUR_COLOUR = "#00e5ff"
"""Outline of the segmented object: cyan is in neither ``inferno`` nor the grey scan, and far from ``viridis``."""

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


def display_cutoff(value_range: Sequence[float], threshold: float) -> float:
    """The value below which a map is not drawn: ``threshold`` is a fraction of its value range."""
    lo, hi = (float(v) for v in value_range)
    return lo + float(threshold) * (hi - lo)


def grey_rgb(scan: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """A scan slice as grey RGB float (H, W, 3) in [0, 1] through ``window`` (NaN shown black)."""
    lo, hi = window
    grey = np.clip((np.nan_to_num(scan.astype(np.float64), nan=lo) - lo) / (hi - lo), 0.0, 1.0)
    return np.repeat(grey[..., None], 3, axis=-1)


def blend(scan: np.ndarray, values: np.ndarray, window: tuple[float, float], colormap: str,
          value_range: Sequence[float], threshold: float, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """A map over a scan slice: RGB float (H, W, 3) in [0, 1].

    The scan is grey through ``window``; where the map reaches ``display_cutoff`` its colour
    (``colormap`` over ``value_range``) is laid over the grey with opacity ``alpha``; elsewhere,
    and everywhere when the map is constant (it then says nothing), the pixel stays grey.
    """
    rgb = grey_rgb(scan, window)
    vmin, vmax = (float(v) for v in value_range)
    if vmax <= vmin:
        return rgb
    shown = np.nan_to_num(values, nan=-np.inf) >= display_cutoff(value_range, threshold)
    colour = colormaps[colormap](Normalize(vmin, vmax, clip=True)(values[shown]))[:, :3]
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


def _three_panels(scan: Volume, title: str) -> tuple[Figure, dict[str, Any], dict[str, float]]:
    """A figure with one panel per plane, titled and marked with patient directions."""
    figure = Figure(figsize=(10, 4.4), layout="constrained")
    figure.suptitle(title, fontsize=11)
    panels = dict(zip(PLANES, figure.subplots(1, 3)))
    for plane, ax in panels.items():
        ax.set_title(plane, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        left, right, top, bottom = EDGE_LETTERS[plane]
        for text, x, y, ha, va in ((left, 0.01, 0.5, "left", "center"), (right, 0.99, 0.5, "right", "center"),
                                   (top, 0.5, 0.99, "center", "top"), (bottom, 0.5, 0.01, "center", "bottom")):
            ax.text(x, y, text, transform=ax.transAxes, ha=ha, va=va, color="white", fontsize=8, fontweight="bold",
                    path_effects=[withStroke(linewidth=2, foreground="black")])  # readable on bright anatomy
    return figure, panels, AnatomicalAxes.of(scan).aspects()


def _outline(ax: Any, mask: np.ndarray) -> None:
    """The object's outline on one panel (nothing when the slice misses the object)."""
    if mask.any() and not mask.all():
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=[CONTOUR_COLOUR], linewidths=1.0)


def render_map_montage(scan: Volume, target_mask: Volume, map_volume: Volume, map_meta: dict[str, Any],
                       center: Sequence[float], path: Path, window: tuple[float, float] | None = None) -> Path:
    """One PNG: the map over the scan on three planes through ``center`` (i, j, k), outline and colour bar.

    Args:
        scan: the scan; ``target_mask`` (the segmented target, bool) and ``map_volume`` on its grid.
        map_meta: the map's entry of ``summary.json`` ("method", "variant", "class", "description",
            "colormap", "threshold", "range").
        window: grey window of the scan (default :func:`scan_window`); pass it to share it between figures.
    """
    _check_grids(scan, segmentation=target_mask, map=map_volume)
    window = window or scan_window(scan.array)
    value_range = [float(v) for v in map_meta["range"]]
    threshold = float(map_meta.get("threshold") or 0.0)
    colormap = map_meta.get("colormap") or "inferno"
    name = map_meta["method"] + (f" / {map_meta['variant']}" if map_meta.get("variant") else "")
    figure, panels, aspects = _three_panels(scan, f"{name}: {map_meta.get('class', '')}")
    scans, masks, values = (orthogonal_slices(v, center) for v in (scan, target_mask, map_volume))
    for plane, ax in panels.items():
        ax.imshow(blend(scans[plane], values[plane], window, colormap, value_range, threshold), aspect=aspects[plane])
        _outline(ax, masks[plane])

    lo, hi = value_range
    bar = figure.colorbar(ScalarMappable(Normalize(lo, hi if hi > lo else lo + 1.0), colormaps[colormap]),
                          ax=list(panels.values()), orientation="horizontal", fraction=0.06, aspect=60)
    cutoff = display_cutoff(value_range, threshold)
    hidden = f"values below {cutoff:.3g} not drawn" if hi > lo else f"the map is constant ({lo:.3g}): nothing drawn"
    bar.set_label(textwrap.fill(f"{map_meta.get('description', '')} [range {lo:.3g} to {hi:.3g}; {hidden}]", 150),
                  fontsize=8)
    bar.ax.tick_params(labelsize=7)
    outline = Line2D([], [], color=CONTOUR_COLOUR, label=f"outline of the segmented {map_meta.get('class', 'object')}")
    figure.legend(handles=[outline], loc="upper right", fontsize=8, frameon=False)
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


def render_sa_curve(curve: Sequence[dict[str, Any]], path: Path, reference: str = "model",
                    review_below: float | None = None) -> Path:
    """Line plot of the per-layer SA score (``[{"layer", "sa", "output"?}]``, forward order).

    Args:
        reference: what the SA score compares with: ``model`` (the model's own mask) or ``label``.
        review_below: draw the case-level review threshold of the mean SA score as a dashed line.
    """
    names = [str(point["layer"]) for point in curve]
    prefix = _common_prefix(names)
    scores = [float(point["sa"]) for point in curve]
    x = np.arange(len(scores))
    figure = Figure(figsize=(min(12.0, max(7.0, 0.4 * len(scores) + 3)), 4.2), layout="constrained")
    ax = figure.subplots()
    ax.plot(x, scores, "-o", color="#1f5fa8", markersize=4, label="SA score of the layer's features")
    output = [n for n, point in enumerate(curve) if point.get("output")]
    if output:
        ax.plot(x[output], np.asarray(scores)[output], "s", markerfacecolor="none", color="#d62728", markersize=8,
                label="output layer (the prediction itself)")
    if review_below is not None:
        ax.axhline(review_below, color="grey", linestyle="--", linewidth=1,
                   label=f"review threshold of the mean SA score ({review_below:g})")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(x, [name[len(prefix):] or name for name in names], rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("layer, input (left) to output (right)" + (f"; names after '{prefix}'" if prefix else ""), fontsize=8)
    ax.set_ylabel("SA score (Dice)", fontsize=8)
    against = "the ground truth" if reference == "label" else "the model's own segmentation"
    ax.set_title(f"Segmentation ability per layer (ProtoSeg), against {against}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save(figure, path)


def _common_prefix(names: Sequence[str]) -> str:
    """The dotted prefix all layer names share ('model.'), so the tick labels show what differs."""
    if len(names) < 2:
        return ""
    parts = [name.split(".") for name in names]
    shared = []
    for tokens in zip(*parts):
        if len(set(tokens)) > 1:
            break
        shared.append(tokens[0])
    shared = shared[: min(len(p) for p in parts) - 1]  # keep at least one token of every name
    return ".".join(shared) + "." if shared else ""
