"""How a map is shown: its colour range, its threshold and the words that say both.

One rule, computed once when ``segxai explain`` writes a map (``summary["maps"][n]["display"]``) and read by
the report's pictures, its NiiVue viewer and the Slicer module, so a map looks the same everywhere:

- **fractions** (probabilities, fractions of units, masks, gate openings, path shares: the maps of ProtoSeg,
  MiSuRe, attention gates and fusion, when their values lie in [0, 1]): the whole scale 0 to 1, so that 0.5 is
  always the middle colour;
- **signed** maps (variant ``signed``, or a map whose most negative value inside the head is beyond 1% of its
  largest magnitude): symmetric, -m to +m with m the 99th percentile of |value| inside the head, drawn with a
  diverging colour map; the threshold hides |value| < t, so both signs are shown;
- every other map (relative saliency, uncertainty in nats, variance, occlusion): 0 to the 99th percentile
  inside the head. A map concentrated on a small part of the head would look blank under a 0-to-maximum bar;
  the few values above the range are drawn in the top colour.

"Inside the head" is the scan's foreground: voxels brighter than the scan's Otsu threshold (the grey level
that best separates the body from the air around it), holes filled, so dark fluid inside the head counts.
Where the 99th percentile is 0 (the map is 0 on more than 99% of the head) the largest value inside the
head is used instead.

The threshold of a map (``summary["maps"][n]["threshold"]``) is a fraction of the range: of its width for
non-negative maps, of m for signed ones; a signed map is drawn from at least :data:`SIGNED_MIN_THRESHOLD`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from ..glossary import readable as _readable

PERCENTILE = 99.0
"""The colour range of a level or signed map ends at this percentile of its values inside the head."""

FRACTION_METHODS = ("protoseg", "misure", "attention", "fusion")
"""Methods whose maps are probabilities, fractions or masks on the scale 0 to 1."""

SIGNED_TOLERANCE = 0.01
"""A map counts as signed when its most negative value reaches beyond this fraction of its largest magnitude
(smaller negative values are interpolation ripple of a non-negative map)."""

SIGNED_MIN_THRESHOLD = 0.1
"""Signed maps are drawn where |value| >= this fraction of m at least: a diverging colour map draws values
near 0 almost white, which would veil the whole scan."""

DIVERGING_COLORMAP = "RdBu_r"
"""Blue for negative, white for 0, red for positive: for signed maps whose own colour map is one-sided."""

DIVERGING_COLORMAPS = ("RdBu_r", "RdBu", "coolwarm", "bwr", "seismic", "PuOr", "PiYG", "PRGn", "BrBG", "RdYlBu")
"""Colour maps with a neutral middle: a signed map keeps its own when it is one of these."""

UNITS = {"entropy": "nats", "mutual_information": "nats"}
"""Units named in the colour bar's caption, by map variant (the description explains the others)."""

_HISTOGRAM_BINS = 256


# ------------------------------------------------------------------ the head
def otsu_threshold(values: np.ndarray) -> float:
    """The grey level that maximises the between-class variance of ``values`` (Otsu 1979), on 256 bins."""
    finite = values[np.isfinite(values)].astype(np.float64)
    if finite.size == 0 or finite.min() == finite.max():
        return float(finite.min()) if finite.size else 0.0
    counts, edges = np.histogram(finite, bins=_HISTOGRAM_BINS)
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)[:-1].astype(np.float64)
    weight_high = finite.size - weight_low
    sum_low = np.cumsum(counts * centres)[:-1]
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (np.sum(counts * centres) - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[1 + int(np.argmax(between))])


def head_mask(scan: np.ndarray) -> np.ndarray:
    """Bool mask (K, J, I) of the scan's foreground: above its Otsu threshold, holes filled.

    The whole volume when that leaves nothing (a blank scan).
    """
    scan = np.asarray(scan)
    mask = np.nan_to_num(scan.astype(np.float32), nan=-np.inf) > otsu_threshold(scan)
    mask = ndimage.binary_fill_holes(mask)
    return mask if mask.any() else np.ones(scan.shape, bool)


# ------------------------------------------------------------------ the range
@dataclass(frozen=True)
class MapDisplay:
    """How one map is coloured.

    Attributes:
        low, high: the colour bar's ends (values beyond are drawn in the end colours).
        signed: the range is symmetric about 0 and the threshold two-sided.
        threshold: fraction of the range below which a value is not drawn (of ``high`` for signed maps).
        colormap: matplotlib name of the colour map.
        rule: how the range was chosen, in words ("99th percentile inside the head").
        unit: the values' unit for the caption ("nats"), or "".
        peak: index (i, j, k) of the map's peak inside the head (:func:`map_peak`); ``peak_value`` the map there.
    """

    low: float
    high: float
    signed: bool
    threshold: float
    colormap: str
    rule: str
    unit: str = ""
    peak: tuple[float, float, float] = (0.0, 0.0, 0.0)
    peak_value: float = 0.0

    @property
    def constant(self) -> bool:
        """The map has a single value: it says nothing and nothing of it is drawn."""
        return not self.high > self.low

    @property
    def cutoff(self) -> float:
        """The value below which (|value| below which, for signed maps) nothing is drawn."""
        if self.signed:
            return self.threshold * self.high
        return self.low + self.threshold * (self.high - self.low)

    def shown(self, values: np.ndarray) -> np.ndarray:
        """Bool mask of the ``values`` drawn: finite and past the cutoff (in size, for signed maps)."""
        values = np.asarray(values, dtype=np.float64)
        if self.constant:
            return np.zeros(values.shape, bool)
        finite = np.isfinite(values)
        measured = np.abs(values) if self.signed else values
        return finite & (np.where(finite, measured, -np.inf) >= self.cutoff)

    def caption(self) -> str:
        """The colour bar's caption: the range, its rule and what is not drawn, with rounded numbers."""
        unit = f" {self.unit}" if self.unit else ""
        if self.constant:
            return f"the map is {readable(self.low)}{unit} everywhere: nothing to draw"
        if self.signed:
            shown = (f"|value| below {readable(self.cutoff)} not drawn (both signs drawn)" if self.cutoff > 0
                     else "every value drawn")
            return f"colours from \u2212{readable(self.high)} to +{readable(self.high)}{unit} ({self.rule}); {shown}"
        hidden = f"values below {readable(self.cutoff)} not drawn" if self.cutoff > self.low else "every value drawn"
        return f"colours from {readable(self.low)} to {readable(self.high)}{unit} ({self.rule}); {hidden}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MapDisplay:
        fields = {key: data[key] for key in cls.__dataclass_fields__ if key in data}
        if "peak" in fields:
            fields["peak"] = tuple(float(v) for v in fields["peak"])
        return cls(**fields)


def readable(value: float) -> str:
    """A colour-bar number: :func:`SegXAILib.glossary.readable` at two significant digits (0.31, 4,500)."""
    return _readable(float(value), digits=2)


def _is_fraction(meta: dict[str, Any], values: np.ndarray) -> bool:
    finite = values[np.isfinite(values)]
    return (meta.get("method") in FRACTION_METHODS and not meta.get("normalised")
            and (finite.size == 0 or (finite.min() >= -1e-3 and finite.max() <= 1 + 1e-3)))


def _is_signed(meta: dict[str, Any], inside: np.ndarray) -> bool:
    if str(meta.get("variant") or "").endswith("signed"):
        return True
    if inside.size == 0:
        return False
    largest = float(np.abs(inside).max())
    return largest > 0 and float(inside.min()) < -SIGNED_TOLERANCE * largest


def _percentile_end(inside: np.ndarray, of: str) -> tuple[float, str]:
    """The upper end of a range from non-negative magnitudes inside the head, and the words for its rule."""
    if inside.size == 0:
        return 0.0, "no value inside the head"
    end = float(np.percentile(inside, PERCENTILE))
    if end > 0:
        return end, f"{PERCENTILE:.0f}th percentile of {of} inside the head"
    return float(inside.max()), f"largest {of} inside the head, 0 on over {PERCENTILE:.0f}% of it"


def display_range(values: np.ndarray, head: np.ndarray, meta: dict[str, Any]) -> MapDisplay:
    """How one map is shown, by the module's rule: its range, threshold, colour map and peak.

    Args:
        values: the map (K, J, I), on the scan's grid.
        head: bool (K, J, I), :func:`head_mask` of the scan.
        meta: the map's entry of ``summary.json`` ("method", "variant", "normalised", "threshold", "colormap").
    """
    values = np.asarray(values, dtype=np.float32)
    threshold = float(meta.get("threshold") or 0.0)
    colormap = str(meta.get("colormap") or "inferno")
    inside = values[head & np.isfinite(values)]
    signed = False
    if _is_fraction(meta, values):
        low, high, rule = 0.0, 1.0, "the whole scale of 0 to 1"
    elif _is_signed(meta, inside):
        signed = True
        high, rule = _percentile_end(np.abs(inside), "|value|")
        low, rule = -high, f"\u00b1 the {rule}"
        colormap = colormap if colormap in DIVERGING_COLORMAPS else DIVERGING_COLORMAP
        threshold = max(threshold, SIGNED_MIN_THRESHOLD)
    else:
        low = min(0.0, float(inside.min())) if inside.size else 0.0
        end, rule = _percentile_end(inside - low, "the values")
        high, rule = low + end, f"{readable(low)} to the {rule}"
    peak = map_peak(values, head, signed)
    return MapDisplay(low, high, signed, threshold, colormap, rule, UNITS.get(str(meta.get("variant") or ""), ""),
                      peak, float(values[tuple(int(v) for v in peak[::-1])]))


PEAK_SMOOTHING = 3
"""The peak is that of the map averaged over cubes of this many voxels a side: one stray voxel does not win."""


def map_peak(values: np.ndarray, head: np.ndarray, signed: bool) -> tuple[float, float, float]:
    """Index (i, j, k) of the map's peak inside the head: its largest value (|value| when ``signed``) after
    averaging over :data:`PEAK_SMOOTHING` cubes (NaN counted as 0).

    The whole volume is searched when the head is empty.
    """
    values = np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    magnitude = ndimage.uniform_filter(np.abs(values) if signed else values, PEAK_SMOOTHING, mode="nearest")
    searched = np.where(head, magnitude, -np.inf) if head.any() else magnitude
    kji = np.unravel_index(int(np.argmax(searched)), searched.shape)
    return tuple(float(v) for v in kji[::-1])


def map_display(item: dict[str, Any], values: np.ndarray, scan: np.ndarray) -> MapDisplay:
    """The display of one map entry of a summary: the one it carries, else computed from the map ``values``
    and the ``scan`` (both K, J, I, one grid)."""
    if isinstance(item.get("display"), dict):
        return MapDisplay.from_json(item["display"])
    return display_range(values, head_mask(scan), item)


def with_displays(maps: Sequence[dict[str, Any]], scan: np.ndarray,
                  read_map: Callable[[dict[str, Any]], np.ndarray]) -> list[dict[str, Any]]:
    """The summary's map entries, each with its ``display`` (:meth:`MapDisplay.to_json`).

    An entry that carries one keeps it; for the others (a summary written before the rule) it is computed from
    ``read_map(entry)`` (the map, K, J, I, on the grid of ``scan``); the head is found once, when first needed.
    """
    head = None
    completed = []
    for item in maps:
        if not isinstance(item.get("display"), dict):
            head = head_mask(scan) if head is None else head
            item = {**item, "display": display_range(read_map(item), head, item).to_json()}
        completed.append(item)
    return completed
