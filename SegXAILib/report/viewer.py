"""The report's interactive viewer: every slice of the scan in three planes, the segmentation and each map as layers.

The viewer is NiiVue (a WebGL2 viewer of medical volumes), carried by this package as one pinned file,
``assets/niivue.umd.js`` (version, source and licence in ``assets/README.md``), and written into the page
with the volumes it shows, so ``report.html`` stays one file that opens offline: nothing is fetched.

What the page holds, besides the static pictures (kept for printing: the viewer is hidden on paper):

- NiiVue's script, inline;
- the scan, the segmentation and each map of ``summary["maps"]``, each a gzipped NIfTI-1 file in base64,
  in a ``<script type="application/octet-stream">`` block (data the browser does not run);
- a layer list: a checkbox, an opacity slider and, for maps, a threshold slider (values below it are not
  drawn; for a signed map, values whose size |value| is below it, so both signs stay), named as the report's
  sections name them; sliders through the axial,
  coronal and sagittal slices (and the arrow keys on the picture); the values under the cross in words.

Storage, chosen to lose nothing visible:

- scan: 16-bit integers, exact when its voxels are integers within int16's range (most MRI and CT files),
  else scaled over its [min, max] through the NIfTI ``scl_slope``/``scl_inter`` (65,535 steps);
- segmentation: its labels, exact (uint8; uint16 above 255);
- each map: uint8 over its display range (``summary["maps"][n]["display"]``, the colour bar of its montage,
  chosen by :mod:`.display`'s rule): 256 steps, as many as the colour map it is drawn with has colours; the
  value read under the cross is within 1/510 of the range, and values beyond it read as its end ("at least
  0.31"); NaN is stored as the bottom of the range.

Size rule (``VOLUME_BUDGET``): the embedded volumes, in base64, take at most 22 MiB, so that with NiiVue
(2.3 MB) and the pictures a report of a 256^3 scan stays under about 30 MB. The scan and the segmentation
are kept at full resolution when they take at most two thirds of it (the demo's MNI152 scan resampled to
256^3 takes 9.9 MB; white noise on 256^3 floats would take 42 MB); else both are shown on a grid coarser by
the smallest integer factor that fits (block means of the scan, the label at each block's centre). The rest
is the maps': all kept at full resolution if together they fit, else all averaged over blocks of 2^3, 3^3, ...
voxels (one grid for every map, so they stay comparable) until they do, at most 8^3 (NiiVue draws a map on a
coarser grid over the scan's). A layer that was made coarser says so in the layer list.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import html
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps

from ..errors import SegXAIError
from ..glossary import map_title
from ..volume import Volume, label_dtype, read_volume
from .display import MapDisplay, with_displays
from .montage import OVERLAY_ALPHA, class_colours

NIIVUE_JS = Path(__file__).with_name("assets") / "niivue.umd.js"
NIIVUE_VERSION = "0.69.0"
NIIVUE_SHA256 = "47b896b77ec4a5be3ef1949c33ad393b6f45629921f326c279000bcf51bdb4af"
"""The pinned build (``dist/niivue.umd.js`` of the npm package ``@niivue/niivue``); checked when read."""

VOLUME_BUDGET = 22 * 2**20
"""Bytes of base64 that the embedded volumes may take, all together."""

SCAN_SHARE = 2 / 3
"""The part of the budget the scan and the segmentation may take at full resolution; the maps have the rest."""

MAX_FACTOR = 8
"""The coarsest grid a volume is shown on: blocks of 8^3 voxels (a 256^3 map becomes 32^3)."""

_INT16 = np.iinfo(np.int16)


# ------------------------------------------------------------------ encoding
def nifti_gz(array: np.ndarray, ijk_to_ras: np.ndarray, slope: float = 1.0, inter: float = 0.0) -> bytes:
    """A (K, J, I) array on the grid ``ijk_to_ras`` as a gzipped NIfTI-1 file (sform and qform: the RAS grid).

    The voxels are stored as they are (their dtype); ``slope`` and ``inter`` are the file's
    ``scl_slope``/``scl_inter``, which a reader applies: value = slope * stored + inter.
    """
    from nibabel.nifti1 import Nifti1Header  # nibabel comes with nilearn; imported only when a report is drawn

    header = Nifti1Header()
    header.set_data_dtype(array.dtype)
    header.set_data_shape(array.shape[::-1])  # NIfTI's i, j, k; i runs fastest, as in a C-ordered (K, J, I) array
    header.set_sform(ijk_to_ras, code=1)
    header.set_qform(ijk_to_ras, code=1)
    header.set_xyzt_units("mm")
    header.set_slope_inter(slope, inter)
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\0" * 4 + np.ascontiguousarray(array).tobytes()
    return gzip.compress(raw, compresslevel=6, mtime=0)


def encode_scan(volume: Volume) -> bytes:
    """The scan as 16-bit integers: exact when its voxels are integers in int16's range, else scaled (65,535 steps)."""
    array = volume.array
    finite = np.isfinite(array) if array.dtype.kind == "f" else None
    values = array[finite] if finite is not None and not finite.all() else array
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if lo >= _INT16.min and hi <= _INT16.max and (array.dtype.kind in "iub" or np.array_equal(values, np.rint(values))):
        stored = np.where(finite, array, 0) if finite is not None else array
        return nifti_gz(stored.astype(np.int16), volume.ijk_to_ras)
    step = (hi - lo) / 65535 if hi > lo else 1.0
    scaled = np.rint((np.nan_to_num(array, nan=lo, posinf=hi, neginf=lo) - lo) / step) + _INT16.min
    stored = np.clip(scaled, _INT16.min, _INT16.max).astype(np.int16)
    return nifti_gz(stored, volume.ijk_to_ras, step, lo - _INT16.min * step)


def encode_labels(volume: Volume) -> bytes:
    """A label map, exact: uint8, or uint16 when a label is above 255."""
    array = np.asarray(volume.array)
    return nifti_gz(array.astype(label_dtype(int(array.max(initial=0)))), volume.ijk_to_ras)


def encode_map(volume: Volume, value_range: Sequence[float]) -> bytes:
    """A map as uint8 over ``value_range`` (256 steps; NaN as the bottom), the range restored by ``scl_slope``."""
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        return nifti_gz(np.zeros(volume.shape, np.uint8), volume.ijk_to_ras, 1.0, lo)
    step = (hi - lo) / 255
    values = np.nan_to_num(volume.array.astype(np.float32), nan=lo, posinf=hi, neginf=lo)
    stored = np.clip(np.rint((values - lo) / step), 0, 255).astype(np.uint8)
    return nifti_gz(stored, volume.ijk_to_ras, step, lo)


def downsample(volume: Volume, factor: int, labels: bool = False) -> Volume:
    """``volume`` on a grid ``factor`` times coarser along each axis.

    Each new voxel covers a block of ``factor``^3 voxels (the last blocks of an axis may be cut short): its
    value is the block's mean (NaN counted as the lowest finite value), or for ``labels`` the label at the
    block's centre. The new grid's voxel centres lie at the blocks' centres, so the anatomy stays in place.
    """
    if factor == 1:
        return volume
    if labels:
        start = (factor - 1) // 2
        array = volume.array[start::factor, start::factor, start::factor]
        offset = float(start)
    else:
        array = volume.array.astype(np.float32)
        if np.isnan(array).any():
            array = np.nan_to_num(array, nan=float(np.nanmin(array)) if np.isfinite(array).any() else 0.0)
        blocks = [-(-n // factor) for n in array.shape]
        padded = np.pad(array, [(0, b * factor - n) for b, n in zip(blocks, array.shape)], mode="edge")
        array = padded.reshape(blocks[0], factor, blocks[1], factor, blocks[2], factor).mean(axis=(1, 3, 5))
        offset = (factor - 1) / 2
    origin = (volume.ijk_to_ras @ np.array([offset, offset, offset, 1.0]))[:3]
    return Volume(np.ascontiguousarray(array), volume.spacing * factor, origin, volume.direction)


def display_ends(item: dict[str, Any]) -> tuple[float, float]:
    """The ends of a summary map entry's display range (its ``display``, :mod:`.display`)."""
    return float(item["display"]["low"]), float(item["display"]["high"])


def base64_size(raw: int) -> int:
    """Length of ``raw`` bytes in base64."""
    return 4 * (-(-raw // 3))


def fit(encode: Callable[[Volume], bytes], volume: Volume, budget: int, labels: bool = False,
        start: int = 1) -> tuple[bytes, int]:
    """``encode(volume)`` on the finest grid (from ``start``) whose base64 fits ``budget``; (bytes, factor).

    At :data:`MAX_FACTOR` the result is taken whatever its size.
    """
    factor = start
    while True:
        data = encode(downsample(volume, factor, labels))
        size = base64_size(len(data))
        if size <= budget or factor >= MAX_FACTOR:
            return data, factor
        # gzip sizes scale roughly with the voxel count: jump to the factor that should fit, at least one more
        factor = min(MAX_FACTOR, max(factor + 1, int(factor * (size / budget) ** (1 / 3))))


def encode_maps(folder: Path, maps: Sequence[dict[str, Any]], budget: int) -> tuple[list[bytes], int]:
    """Every map of the summary encoded on one grid: the finest whose base64, all maps together, fits ``budget``.

    The maps are read one at a time (each is as large as the scan), once per grid tried. At :data:`MAX_FACTOR`
    the result is taken whatever its size.
    """
    factor = 1
    while True:
        encoded: list[bytes] = []
        total = 0
        for item in maps:
            volume = read_volume(folder / item["file"])
            encoded.append(encode_map(downsample(volume, factor), display_ends(item)))
            del volume  # one scan-sized map in memory at a time
            total += base64_size(len(encoded[-1]))
            if total > budget and factor < MAX_FACTOR:
                break  # this grid is too fine already
        if total <= budget or factor >= MAX_FACTOR:
            return encoded, factor
        expected = total * len(maps) / len(encoded)  # the maps not encoded yet taken as large as those that were
        factor = min(MAX_FACTOR, max(factor + 1, int(factor * (expected / max(budget, 1)) ** (1 / 3))))


# ------------------------------------------------------------------ layers
@dataclass
class Layer:
    """One volume of the viewer: its data and how it is drawn (the JSON the page's script reads)."""

    name: str
    kind: str  # "scan", "segmentation" or "map"
    data: bytes
    factor: int
    settings: dict[str, Any] = field(default_factory=dict)

    def config(self, index: int) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "block": f"segxai-volume-{index}",
                "file": f"{self.kind}-{index}.nii.gz", "factor": self.factor, **self.settings}


def layer_title(item: dict[str, Any]) -> str:
    """A map layer's name in the viewer: the map's reader name (:func:`SegXAILib.glossary.map_title`) and class."""
    title = map_title(item["method"], item.get("variant"))
    return title + (f" ({item['class']})" if item.get("class") else "")


def colormap_rgb(name: str) -> list[list[int]]:
    """A matplotlib colour map as 256 RGB triplets (0-255), the colours of the montages.

    The page's script turns them into one NiiVue colour map per map layer, spread over the part of the map's
    display range, with the values the threshold hides transparent, so a value has the montage's colour.
    """
    return np.rint(colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(int).tolist()


def label_lut(classes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The segmentation's colours as drawn in the montage, with the class names NiiVue shows for each label."""
    colours = class_colours(classes)
    names = {int(c["label"]): str(c["name"]) for c in classes}
    top = max([0, *colours])
    lut: dict[str, Any] = {"R": [], "G": [], "B": [], "A": [], "I": [],
                           "labels": [names.get(v, "") for v in range(top + 1)]}
    for value in range(top + 1):
        rgb = colours.get(value, (0.0, 0.0, 0.0))
        for key, channel in zip("RGB", rgb):
            lut[key].append(int(round(channel * 255)))
        lut["A"].append(255 if value in colours else 0)
        lut["I"].append(value)
    return lut


def viewer_layers(folder: Path, summary: dict[str, Any], scan: Volume, segmentation: Volume,
                  window: tuple[float, float], budget: int = VOLUME_BUDGET) -> list[Layer]:
    """The scan, the segmentation and every map of the summary, encoded within ``budget`` (see the module's rule)."""
    scan_data, factor = encode_scan(scan), 1
    labels_data = encode_labels(segmentation)
    allowed = int(budget * SCAN_SHARE)
    if base64_size(len(scan_data) + len(labels_data)) > allowed:  # too large even alone: both coarser
        share = allowed * base64_size(len(scan_data)) // base64_size(len(scan_data) + len(labels_data))
        scan_data, factor = fit(encode_scan, scan, share, start=2)
        labels_data = encode_labels(downsample(segmentation, factor, labels=True))
    lo, hi = window
    layers = [
        Layer("scan", "scan", scan_data, factor, {"colormap": "gray", "cal_min": lo, "cal_max": hi, "opacity": 1.0}),
        Layer("segmentation", "segmentation", labels_data, factor,
              {"colormap": "", "opacity": OVERLAY_ALPHA, "lut": label_lut(summary.get("classes", []))}),
    ]
    maps = with_displays(summary.get("maps", []), scan.array, lambda item: read_volume(folder / item["file"]).array)
    encoded, map_factor = encode_maps(folder, maps, budget - sum(base64_size(len(layer.data)) for layer in layers))
    for item, data in zip(maps, encoded):
        display = MapDisplay.from_json(item["display"])
        lo, hi = display_ends(item)
        layers.append(Layer(layer_title(item), "map", data, map_factor, {
            "colormap": f"segxai-layer-{len(layers)}", "matplotlib": display.colormap, "opacity": OVERLAY_ALPHA,
            "cal_min": lo, "cal_max": hi if hi > lo else lo + 1.0, "range": [lo, hi], "signed": display.signed,
            "threshold": display.cutoff, "step": (hi - lo) / 255 if hi > lo else 0.0,
            "description": item.get("description", ""), "caption": display.caption(), "shown": len(layers) == 2}))
    return layers


# ------------------------------------------------------------------ the section
def niivue_script() -> str:
    """The pinned NiiVue build, checked against its hash, ready to sit inside a ``<script>`` element."""
    try:
        data = NIIVUE_JS.read_bytes()
    except OSError as exc:
        raise SegXAIError(f"the report's viewer script {NIIVUE_JS} cannot be read ({exc}); reinstall segxai") from exc
    if hashlib.sha256(data).hexdigest() != NIIVUE_SHA256:
        raise SegXAIError(f"{NIIVUE_JS} is not the pinned NiiVue {NIIVUE_VERSION} build (its SHA-256 differs); "
                          "reinstall segxai")
    text = data.decode("utf-8")
    lowered = text.lower()
    if "</script" in lowered or "<!--" in lowered:  # would end or confuse the inline <script> element
        raise SegXAIError(f"{NIIVUE_JS} cannot be written inline into the page")
    return text


def _script_json(value: Any) -> str:
    """JSON that can sit inside a ``<script>`` element: no "<" (no "</script" ends it, no "<!--" confuses it)."""
    return json.dumps(value, separators=(",", ":")).replace("<", "\\u003c")


def _layer_row(index: int, layer: Layer) -> str:
    name = html.escape(layer.name)
    if layer.kind == "scan":
        return (f"<tr><td></td><td><b>{name}</b> <small>(grey, always shown; {_grid_note(layer)})</small></td>"
                f"<td colspan=\"2\"></td></tr>")
    settings = layer.settings
    opacity = (f"<input type=\"range\" min=\"0\" max=\"1\" step=\"0.05\" value=\"{settings['opacity']:.2f}\" "
               f"data-opacity=\"{index}\" aria-label=\"opacity of {name}\">")
    threshold = ""
    if layer.kind == "map":
        lo, hi = settings["range"]
        step = settings["step"] or 1.0
        start = 0.0 if settings["signed"] else lo  # a signed map's threshold is a size: 0 to the range's end
        threshold = (f"<input type=\"range\" min=\"{start!r}\" max=\"{hi!r}\" step=\"{step!r}\" "
                     f"value=\"{settings['threshold']!r}\" data-threshold=\"{index}\" "
                     f"aria-label=\"threshold of {name}\"{'' if hi > lo else ' disabled'}> "
                     f"<output data-threshold-value=\"{index}\"></output>")
    title = " ".join(filter(None, (settings.get("description"), settings.get("caption") and
                                   f"Colours: {settings['caption']}.")))
    title = f" title=\"{html.escape(title)}\"" if title else ""
    checked = " checked" if settings.get("shown", True) else ""
    return (f"<tr><td><input type=\"checkbox\"{checked} data-layer=\"{index}\" id=\"segxai-layer-{index}\"></td>"
            f"<td><label for=\"segxai-layer-{index}\"{title}>{name}</label> <small>({_grid_note(layer)})</small></td>"
            f"<td>{opacity}</td><td>{threshold}</td></tr>")


def _grid_note(layer: Layer) -> str:
    if layer.factor == 1:
        return "full resolution"
    return f"shown {layer.factor}x coarser along each axis, to keep this page small"


def viewer_section(folder: Path, summary: dict[str, Any], scan: Volume, segmentation: Volume,
                   center: Sequence[float], window: tuple[float, float], budget: int = VOLUME_BUDGET) -> str:
    """The report's "Scroll through the scan" section: NiiVue, the volumes, the controls (HTML with its scripts).

    Args:
        folder: the output folder (the maps are read from it, one at a time).
        summary: its ``summary.json``.
        scan, segmentation: as read by the report; ``center`` (i, j, k) is where the cross starts: the
            slices of the static pictures.
        window: the grey window of the scan, as in the pictures.
    """
    layers = viewer_layers(Path(folder), summary, scan, segmentation, window, budget)
    start = (scan.ijk_to_ras @ np.append(np.asarray(center, dtype=np.float64), 1.0))[:3]
    config = {
        "layers": [layer.config(n) for n, layer in enumerate(layers)],
        "colormaps": {name: colormap_rgb(name)
                      for name in sorted({layer.settings["matplotlib"] for layer in layers if layer.kind == "map"})},
        "rasToIjk": np.linalg.inv(scan.ijk_to_ras).tolist(),
        "shape": list(scan.shape[::-1]),  # i, j, k
        "start": start.tolist(),
        "niivue": NIIVUE_VERSION,
    }
    rows = "".join(_layer_row(n, layer) for n, layer in enumerate(layers))
    blocks = "".join(f"<script type=\"application/octet-stream\" id=\"segxai-volume-{n}\">"
                     f"{base64.b64encode(layer.data).decode('ascii')}</script>\n" for n, layer in enumerate(layers))
    sliders = "".join(
        f"<label>{plane} <small>({way})</small> <input type=\"range\" min=\"0\" max=\"1\" step=\"1\" value=\"0\" "
        f"data-plane=\"{axis}\" aria-label=\"{plane} slice\"> <output data-plane-value=\"{axis}\"></output></label>"
        for plane, way, axis in (("axial", "feet to head", 2), ("coronal", "back to front", 1),
                                 ("sagittal", "patient's left to right", 0)))
    return f"""<section class="segxai-viewer" id="segxai-viewer" data-state="loading">
<h2>Scroll through the scan</h2>
<p>Every slice of the scan in three planes, oriented as the pictures below (patient's right on the left). Click or
drag on a picture to move the cross; the slice sliders, the mouse wheel over a picture, or the arrow keys
(up and down: through the slices of the plane last clicked) scroll through the slices. Tick a layer to show it;
its opacity slider fades it; a map's threshold slider sets the value below which the map is not drawn (it starts at
the threshold of the pictures; for a signed map, blue-white-red, it hides the values closer to 0 than the threshold,
on both sides). The colours span each map's display range, as in its picture below. This viewer needs a browser
with WebGL2; on paper, the pictures below stand in for it.</p>
<style>{_CSS}</style>
<div class="segxai-viewer-canvas"><canvas id="segxai-canvas" tabindex="0"
aria-label="the scan in three planes with the layers ticked below"></canvas></div>
<p class="segxai-location" id="segxai-location" aria-live="polite">Loading the viewer&hellip;</p>
<div class="segxai-slices">{sliders}</div>
<table class="segxai-layers"><thead><tr><th>Show</th><th>Layer</th><th>Opacity</th>
<th>Threshold (drawn from)</th></tr></thead><tbody>{rows}</tbody></table>
<script type="application/json" id="segxai-viewer-config">{_script_json(config)}</script>
{blocks}<script>{niivue_script()}</script>
<script>{_VIEWER_JS}</script>
</section>"""


_CSS = """
.segxai-viewer-canvas{width:100%;height:430px;background:#000;border-radius:4px}
.segxai-viewer-canvas canvas{width:100%;height:100%;display:block;outline:none}
.segxai-location{font-variant-numeric:tabular-nums;background:#f6f6f6;border:1px solid #ddd;border-radius:4px;
padding:.4em .6em;min-height:2.9em;margin:.5em 0}
.segxai-slices{display:flex;flex-wrap:wrap;gap:.4em 1.5em;margin:.4em 0}
.segxai-slices input{vertical-align:middle;width:11em}
.segxai-layers input[type=range]{width:9em;vertical-align:middle}
.segxai-layers output,.segxai-slices output{font-variant-numeric:tabular-nums;font-size:.9em}
@media print{.segxai-viewer{display:none}}
"""

_VIEWER_JS = r"""
(function () {
  "use strict";
  const section = document.getElementById("segxai-viewer");
  const where = document.getElementById("segxai-location");
  const config = JSON.parse(document.getElementById("segxai-viewer-config").textContent);
  const layers = config.layers;
  function fail(message) {
    section.dataset.state = "error";
    where.textContent = "The interactive viewer could not start (" + message + "); the pictures below show " +
      "the same layers.";
  }
  function number(value) {
    if (!Number.isFinite(value)) return String(value);
    const a = Math.abs(value);
    if (a !== 0 && (a < 0.001 || a >= 100000)) {  // "2.8 × 10^-18", not "2.81e-18"
      const [mantissa, exponent] = value.toExponential(1).split("e");
      return mantissa + " \u00d7 10^" + Number(exponent);
    }
    return String(Number(value.toPrecision(3)));
  }
  function voxel(mm) {
    const m = config.rasToIjk;
    return [0, 1, 2].map((r) => Math.round(m[r][0] * mm[0] + m[r][1] * mm[1] + m[r][2] * mm[2] + m[r][3]));
  }
  if (typeof niivue === "undefined") { fail("NiiVue did not load"); return; }
  if (!document.createElement("canvas").getContext("webgl2")) { fail("this browser has no WebGL2"); return; }

  const canvas = document.getElementById("segxai-canvas");
  const nv = new niivue.Niivue({
    backColor: [0, 0, 0, 1], crosshairColor: [0, 0.9, 1, 1], isRadiologicalConvention: true,
    sagittalNoseLeft: true, multiplanarShowRender: niivue.SHOW_RENDER.NEVER,
    multiplanarLayout: niivue.MULTIPLANAR_TYPE.ROW, isColorbar: true, dragAndDropEnabled: false,
    show3Dcrosshair: false, loadingText: "loading the scan ...", logLevel: "error",
  });
  const shown = layers.map((layer) => layer.shown !== false);
  // a map's threshold: values below it are not drawn; for a signed map, values whose size |value| is below it
  const threshold = layers.map((layer) => layer.threshold);
  function drawn(n, value) {
    const layer = layers[n];
    const [lo, hi] = layer.range;
    const half = layer.step / 2;  // the map is stored in steps: compare as the stored levels do
    return hi > lo && (layer.signed ? Math.abs(value) >= threshold[n] - half : value >= threshold[n] - half);
  }
  // a map's colour map spans its display range (cal_min to cal_max) with the montage's colours; the entries
  // of values that the threshold hides are transparent
  function mapColours(n) {
    const layer = layers[n];
    const base = config.colormaps[layer.matplotlib];
    const [lo, hi] = layer.range;
    const lut = {R: [], G: [], B: [], A: [], I: []};
    for (let t = 0; t < 256; t++) {
      const value = layer.cal_min + (t / 255) * (layer.cal_max - layer.cal_min);
      const u = hi > lo ? Math.min(Math.max((value - lo) / (hi - lo), 0), 1) : 0;
      const rgb = base[Math.round(u * 255)];
      lut.R.push(rgb[0]); lut.G.push(rgb[1]); lut.B.push(rgb[2]); lut.A.push(drawn(n, value) ? 255 : 0);
      lut.I.push(t);
    }
    nv.addColormap(layer.colormap, lut);
  }
  function mapValue(n, value) {  // values beyond the display range were stored as its ends
    const layer = layers[n];
    const [lo, hi] = layer.range;
    if (hi > lo && value >= hi - layer.step / 2) return "at least " + number(hi);
    if (hi > lo && layer.signed && value <= lo + layer.step / 2) return "at most " + number(lo);
    return number(value);
  }
  const opacity = layers.map((layer) => layer.opacity);
  let plane = 0;  // the plane the arrow keys scroll: 0 axial, 1 coronal, 2 sagittal
  const sliders = Array.from(section.querySelectorAll("input[data-plane]"));

  function describe(data) {
    const mm = data.mm;
    const ijk = voxel(mm);
    const parts = ["Cross at voxel (i, j, k) = (" + ijk.join(", ") + "), RAS (" +
      [0, 1, 2].map((n) => mm[n].toFixed(1)).join(", ") + ") mm."];
    data.values.forEach((entry, n) => {
      const layer = layers[n];
      if (!layer) return;
      let text;
      if (layer.kind === "segmentation") {
        const label = Math.round(entry.value);
        const name = (layer.lut.labels || [])[label];
        text = label === 0 ? "background (label 0)" : (name || "label") + " (label " + label + ")";
      } else if (layer.kind === "map") {
        text = mapValue(n, entry.value) + (drawn(n, entry.value) ? " (drawn)" : " (below the threshold)");
      } else {
        text = number(entry.value);
      }
      parts.push(layer.name + ": " + text + (n > 0 && !shown[n] ? " [hidden]" : ""));
    });
    return parts;
  }
  function syncSliders() {
    const dims = nv.volumes[0].dimsRAS;
    const frac = nv.scene.crosshairPos;
    sliders.forEach((input) => {
      const axis = Number(input.dataset.plane);
      const count = dims[axis + 1];
      input.max = String(count - 1);
      input.value = String(Math.round(frac[axis] * count - 0.5));
      section.querySelector('output[data-plane-value="' + axis + '"]').textContent =
        (Number(input.value) + 1) + " of " + count;
    });
  }
  nv.onLocationChange = function (data) {
    const parts = describe(data);
    where.textContent = "";
    parts.forEach((part, n) => {
      if (n > 0) where.appendChild(document.createElement("br"));
      where.appendChild(document.createTextNode(part));
    });
    if (data.axCorSag >= 0 && data.axCorSag <= 2) plane = data.axCorSag;
    syncSliders();
  };

  async function start() {
    await nv.attachToCanvas(canvas);
    layers.forEach((layer, n) => { if (layer.kind === "map") mapColours(n); });
    for (const [n, layer] of layers.entries()) {
      const image = await niivue.NVImage.loadFromBase64({
        base64: document.getElementById(layer.block).textContent.trim(), name: layer.file,
        colormap: layer.colormap || "gray", opacity: shown[n] ? layer.opacity : 0,
        cal_min: layer.cal_min === undefined ? NaN : layer.cal_min,
        cal_max: layer.cal_max === undefined ? NaN : layer.cal_max,
        colorbarVisible: layer.kind === "map" && shown[n], trustCalMinMax: true,
      });
      if (!image || !image.hdr) throw new Error("layer " + layer.name + " could not be read");
      if (layer.kind === "segmentation") image.setColormapLabel(layer.lut);
      nv.addVolume(image);
      if (n === 0) where.textContent = "Loading the layers ...";
    }
    nv.setSliceType(nv.sliceTypeMultiplanar);
    nv.scene.crosshairPos = nv.mm2frac(config.start, 0, true);
    nv.updateGLVolume();
    nv.drawScene();
    nv.createOnLocationChange();
  }

  function redraw() {
    layers.forEach((layer, n) => {
      if (n === 0) return;
      nv.volumes[n].opacity = shown[n] ? opacity[n] : 0;
      if (layer.kind === "map") { nv.volumes[n].colorbarVisible = shown[n]; mapColours(n); }
    });
    nv.updateGLVolume();
    nv.createOnLocationChange();
  }
  section.querySelectorAll("input[data-layer]").forEach((input) => input.addEventListener("change", () => {
    shown[Number(input.dataset.layer)] = input.checked;
    redraw();
  }));
  section.querySelectorAll("input[data-opacity]").forEach((input) => input.addEventListener("input", () => {
    const n = Number(input.dataset.opacity);
    opacity[n] = Number(input.value);
    redraw();
  }));
  section.querySelectorAll("input[data-threshold]").forEach((input) => {
    const n = Number(input.dataset.threshold);
    const show = () => {
      const layer = layers[n];
      const [lo, hi] = layer.range;
      const value = Number(input.value);
      const fraction = hi > lo ? (layer.signed ? value / hi : (value - lo) / (hi - lo)) : 0;
      section.querySelector('output[data-threshold-value="' + n + '"]').textContent = layer.signed
        ? "|value| \u2265 " + number(value) + " (" + Math.round(100 * fraction) + "% of the range's end)"
        : number(value) + " (" + Math.round(100 * fraction) + "% of the range)";
    };
    show();
    input.addEventListener("input", () => {
      show();
      if (!nv.volumes[n]) return;
      threshold[n] = Number(input.value);
      redraw();
    });
  });
  sliders.forEach((input) => input.addEventListener("input", () => {
    if (!nv.volumes.length) return;
    const axis = Number(input.dataset.plane);
    const count = nv.volumes[0].dimsRAS[axis + 1];
    const frac = Array.from(nv.scene.crosshairPos);
    frac[axis] = (Number(input.value) + 0.5) / count;
    nv.scene.crosshairPos = frac;
    nv.drawScene();
    nv.createOnLocationChange();
  }));
  canvas.addEventListener("keydown", (event) => {
    const step = {ArrowUp: 1, ArrowDown: -1, PageUp: 1, PageDown: -1}[event.key];
    if (!step || !nv.volumes.length) return;
    event.preventDefault();
    event.stopPropagation();
    const move = [0, 0, 0];
    move[[2, 1, 0][plane]] = step;
    nv.moveCrosshairInVox(move[0], move[1], move[2]);
  }, true);

  section.segxaiViewer = nv;
  start().then(() => { section.dataset.state = "ready"; }).catch((error) => {
    console.error("SegXAI viewer:", error);
    fail(String(error && error.message ? error.message : error));
  });
})();
"""
