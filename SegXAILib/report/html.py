"""The explanation report: one self-contained HTML page that a radiologist reads without the code.

:func:`write_report` reads only ``summary.json`` of an output folder, the files it names and the
scan at ``summary["input"]``; it never recomputes an explanation. It writes the pictures to
``report/`` (``segmentation.png``, ``montage_<map file stem>.png``, ``sa_curve.png``) and
``report.html``, which embeds the same pictures as data URIs and its CSS inline, so the page can
be mailed or archived on its own; it also embeds the interactive viewer of :mod:`.viewer` (NiiVue, the
scan, the segmentation and the maps, inline too), which the pictures stand in for on paper.

The verdict "review this case" and the scores table are ``summary["review"]``, written by the explain
run with the model card's thresholds (:mod:`SegXAILib.quality`); a summary written before that entry
existed is judged here with the default thresholds. The page speaks a reader's words
(:mod:`SegXAILib.glossary`): methods by their reader names, numbers rounded, and each unit and term it uses
explained once at its end; a run given the true label (``summary["truth"]``) shows its Dice in a table.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import to_hex

from ..errors import SegXAIError
from ..fileio import atomic_write_text
from ..glossary import counted, map_title, method_name, readable, readable_range, terms_used
from ..quality import ScoreRow, review_case
from ..volume import Volume, read_volume, volume_suffix
from .display import with_displays
from .montage import (
    CONTOUR_COLOUR,
    class_colours,
    object_center,
    render_map_montage,
    render_sa_curve,
    render_segmentation_montage,
    render_sequence_shares,
    scan_window,
)
from .viewer import viewer_section


# ------------------------------------------------------------------ the page
def write_report(folder: Path) -> Path:
    """Draw the pictures and write ``folder/report.html`` from ``folder/summary.json``; return its path."""
    start = time.perf_counter()
    folder = Path(folder)
    if not (folder / "summary.json").is_file():
        raise SegXAIError(f"no summary.json in {folder}; run 'segxai explain' with --out {folder} first")
    # json directly: SegXAILib.outputs imports torch and MONAI, which drawing never needs
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    scan = read_volume(summary_scan_path(summary["input"], folder))
    segmentation = read_volume(folder / summary["files"]["segmentation"])
    target = summary.get("target") or {"name": "segmented object",
                                       "labels": [c["label"] for c in summary["classes"] if c["label"] != 0]}
    labels = [int(v) for v in target["labels"]]
    # a multi-label model's classes overlap: the target is its class's own file, the picture the label map's values
    target_file = next((c["file"] for c in summary["classes"] if c["name"] == target["name"] and "file" in c), None)
    if target_file is not None:
        segmentation, labels = segmentation.with_array(read_volume(folder / target_file).array.astype(np.uint8)), [1]
    center = object_center(segmentation.array, labels)
    window = scan_window(scan.array)
    # each map's colour range, threshold and peak (display.py's rule): the summary's, or computed for an older one
    summary["maps"] = with_displays(summary.get("maps", []), scan.array,
                                    lambda item: read_volume(folder / item["file"]).array)

    picture_classes = summary["labelmap"]["values"] if "labelmap" in summary else summary["classes"]
    segmentation_png = render_segmentation_montage(scan, read_volume(folder / summary["files"]["segmentation"]),
                                                   [{"label": v.get("value", v.get("label")), **v}
                                                    for v in picture_classes], center,
                                                   folder / SEGMENTATION_PICTURE, labels, window)
    target_mask = segmentation.with_array(np.isin(segmentation.array, labels))
    montages = []
    for item in summary.get("maps", []):
        map_volume = read_volume(folder / item["file"])
        montages.append(render_map_montage(scan, target_mask, map_volume, item, center,
                                           folder / montage_picture(item["file"]), window))
        del map_volume  # one scan-sized map in memory at a time
    sa = next((e for e in summary.get("explanations", []) if (e.get("curves") or {}).get("sa_per_layer")), None)
    review = summary.get("review") or review_case(summary)
    sa_png = None if sa is None else render_sa_curve(
        sa["curves"]["sa_per_layer"], folder / SA_PICTURE, (sa.get("metadata") or {}).get("reference", "model"),
        review["thresholds"].get("mean_sa", {}).get("threshold"), (sa.get("metadata") or {}).get("network_grid"),
        (summary.get("model_grid") or {}).get("spacing_mm"))

    viewer = viewer_section(folder, summary, scan, segmentation, center, window)  # the interactive viewer
    sequences = _sequence_section(summary, folder, str(target["name"]))
    page = _page(summary, review, target, scan, center, segmentation_png, montages, sa, sa_png,
                 time.perf_counter() - start, viewer, sequences)
    return atomic_write_text(folder / "report.html", page)


def summary_scan_path(text: str | list[str], folder: Path) -> Path:
    """The scan named in the summary (the first, for several sequences, whose grid the results are on): as written
    (absolute, or relative to here), else relative to the folder."""
    text = text if isinstance(text, str) else text[0]
    path = Path(text)
    for candidate in (path, folder / path):
        if candidate.exists():
            return candidate
    raise SegXAIError(f"the scan {text} named in {folder / 'summary.json'} is not found; the report draws every map "
                      "over it: put the scan back, or run 'segxai explain' again")


SEGMENTATION_PICTURE = "report/segmentation.png"
SA_PICTURE = "report/sa_curve.png"
SEQUENCES_PICTURE = "report/sequences.png"
SEQUENCE_SHARES = {"ig_share": "integrated gradients (share of |attribution|)",
                   "occlusion_share": "hiding the sequence (share of the drop in confidence)"}
"""The ``sequences`` method's scalars the report draws as bars, and their words."""


def montage_picture(map_file: str) -> str:
    """The report's picture of the map file ``maps/<stem>.<ext>``: ``report/montage_<stem>.png``.

    Raises:
        SegXAIError: ``map_file`` has no volume suffix.
    """
    name = Path(map_file).name
    return f"report/montage_{name[: -len(volume_suffix(name))]}.png"


def report_files(summary: dict[str, Any]) -> list[str]:
    """Every file :func:`write_report` may write for ``summary`` (relative to its folder); a map file of
    another kind (no volume suffix) has no picture."""
    files = ["report.html", SEGMENTATION_PICTURE, SA_PICTURE, SEQUENCES_PICTURE]
    for item in summary.get("maps") or []:
        try:
            files.append(montage_picture(str(item.get("file", "") if isinstance(item, dict) else "")))
        except SegXAIError:
            continue
    return files


def _page(summary: dict[str, Any], review: dict[str, Any], target: dict[str, Any], scan: Volume, center: np.ndarray,
          segmentation_png: Path, montages: Sequence[Path], sa: dict[str, Any] | None, sa_png: Path | None,
          seconds: float, viewer: str = "", sequences: str = "") -> str:
    name = html.escape(str(target["name"]))
    sections = [
        _header(summary, target),
        _model_purpose(summary),
        _how_to_read(name),
        _scores(review, name),
        _volumes(summary, segmentation_png, scan, center),
        _truth(summary),
        viewer,
        _maps(summary.get("maps", []), montages),
        sequences,
    ]
    if sa is not None and sa_png is not None:
        sections.append(_sa_section(sa, sa_png))
    sections += [_not_applicable(summary.get("not_applicable") or {}), _timings(summary, seconds)]
    # the viewer's text is its own (layer names, controls); the glossary explains the page's words
    sections.append(_glossary([s for s in sections if s is not viewer], len(summary.get("classes") or [])))
    versions = ", ".join(f"{k} {v}" for k, v in (summary.get("versions") or {}).items())
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>SegXAI report: {name}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(s for s in sections if s)
            + f"\n<footer>Made by SegXAI from summary.json and the files it names; nothing was recomputed. "
              f"{html.escape(versions)}</footer>\n</body>\n</html>\n")


def _header(summary: dict[str, Any], target: dict[str, Any]) -> str:
    model = summary.get("model") or {}
    facts = {
        "Model": f"{model.get('name', '?')} ({model.get('architecture', '?')})",
        "Target": f"{target['name']} (label values {', '.join(str(v) for v in target['labels'])})",
        "Input scan": summary.get("input", "?"),
        "Device": summary.get("device", "?"),
        "Report date": datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    }
    return ("<header><h1>SegXAI explanation report</h1>\n<dl>"
            + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in facts.items())
            + "</dl></header>")


def _model_purpose(summary: dict[str, Any]) -> str:
    """What the model is for and where it is known to fail (the card's ``intended_use`` and ``limitations``)."""
    model = summary.get("model") or {}
    rows = [(title, model.get(key)) for title, key in (("Intended use", "intended_use"),
                                                        ("Limitations", "limitations")) if model.get(key)]
    if not rows:
        return ""
    return ("<section class=\"purpose\"><h2>What this model is for</h2>\n<dl>"
            + "".join(f"<dt>{title}</dt><dd>{html.escape(str(text))}</dd>" for title, text in rows)
            + "</dl></section>")


def _how_to_read(target: str) -> str:
    return f"""<section><h2>How to read this</h2>
<p>A computer model outlined the <b>{target}</b> in this scan. The pictures show three slices through the
middle of what it outlined: <b>axial</b> (seen from the feet), <b>coronal</b> (seen from the front) and
<b>sagittal</b> (seen from the patient's left). The patient's right is on the left of the axial and
coronal pictures, as on a radiology workstation; the letters at the edges give the directions
(R right, L left, A front, P back, S head, I feet). The <span style="color:{CONTOUR_COLOUR};
background:#333;padding:0 .2em">cyan line</span> is the model's outline of the {target}.</p>
<p>Each <b>map</b> is a coloured layer over the scan. Explanation maps (black-red-yellow) show which
parts of the image the model relied on: the brighter, the more. Uncertainty maps (blue-green-yellow)
show where repeated predictions disagree or are unsure: the yellower, the less sure. Values below a
display threshold are left uncoloured, so the scan shows through. The maps explain what the model did;
they do not show that its outline is right.</p>
<p>The <b>scores</b> summarise the whole case in a few numbers. A case with a score past its threshold
is marked <span class="flag">review this case</span>: check its outline slice by slice, especially where
the uncertainty maps are bright.</p></section>"""


def _format(value: Any) -> str:
    """A number rounded for reading (:func:`~SegXAILib.glossary.readable`); anything else as text."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return html.escape(str(value))
    return readable(float(value))


def _scores(review: dict[str, Any], target: str) -> str:
    """The verdict of ``summary["review"]`` and its table of scores."""
    rows = [ScoreRow(**score) for score in review["scores"]]
    if not rows:
        return ""
    checks = review.get("checks")  # absent from a summary written before the checks were named
    made = [c["check"] for c in checks or [] if c["made"]]
    missing = [c for c in checks or [] if not c["made"]]
    if review["needed"]:
        flagged = [r for r in rows if r.review]
        verdict = ("<p class=\"verdict review\"><span class=\"flag\">Review this case</span> "
                   + "; ".join(f"{html.escape(r.label)} = {_format(r.value)} ({html.escape(r.rule)})" for r in flagged)
                   + "</p>")
    elif missing:
        verdict = (f"<p class=\"verdict incomplete\"><b>No problem found by the {counted(len(made), 'check')} "
                   f"that ran</b> ({html.escape(', '.join(made) or 'none')}), <b>but {counted(len(missing), 'check')} "
                   f"did not run</b>, so this is no all-clear. This does not prove the outline of the {target} is "
                   "right; look at the pictures.</p>")
    elif checks is None:
        verdict = ("<p class=\"verdict ok\">No score crossed its review threshold. This does not prove the "
                   f"outline of the {target} is right; look at the pictures.</p>")
    else:
        verdict = (f"<p class=\"verdict ok\">No problem found by the {counted(len(made), 'check')} "
                   f"({html.escape(', '.join(made))}). This does not prove the outline of the {target} is right; "
                   "look at the pictures.</p>")
    if missing:
        verdict += ("<p>Not checked:</p><ul class=\"missing\">"
                    + "".join(f"<li><b>{html.escape(c['check'])}</b>: {html.escape(c['how'])}</li>" for c in missing)
                    + "</ul>")
    body = "".join(_score_row(r) for r in rows)
    return ("<section><h2>Case-level scores</h2>\n" + verdict
            + "<table><thead><tr><th>Score</th><th>Value</th><th>What it means</th><th>Threshold</th></tr></thead>"
            + f"<tbody>{body}</tbody></table></section>")


def _score_row(row: ScoreRow) -> str:
    flag = '<br><span class="flag">review</span>' if row.review else ""
    # the summary.json key as a tooltip: a reader meets the label, a programmer can still find the number
    return (f"<tr{' class=review' if row.review else ''}><td title=\"{html.escape(row.key)}\">"
            f"{html.escape(row.label)}</td><td class=\"num\">{_format(row.value)}</td>"
            f"<td>{html.escape(row.meaning)}</td><td>{html.escape(row.rule)}{flag}</td></tr>")


def _volumes(summary: dict[str, Any], segmentation_png: Path, scan: Volume, center: np.ndarray) -> str:
    classes = [c for c in summary.get("classes", []) if int(c["label"]) != 0]
    colours = class_colours(classes)  # as drawn in the picture
    rows = [[f"<span class=\"swatch\" style=\"background:{to_hex(colours[int(c['label'])])}\"></span>"
             + html.escape(c["name"]), str(c["label"]), _voxels(c.get("voxels", "")), _format(c.get("volume_ml", ""))]
            for c in classes]
    rows += [[f"<i>{html.escape(g)}</i> (group)", ", ".join(str(v) for v in info["labels"]),
              _voxels(info.get("voxels", "")), _format(info.get("volume_ml", ""))]
             for g, info in (summary.get("groups") or {}).items()]
    ras = scan.ijk_to_ras @ np.append(center, 1.0)
    caption = (f"Slices through voxel (i, j, k) = ({', '.join(f'{v:.0f}' for v in center)}), "
               f"RAS ({', '.join(f'{v:.1f}' for v in ras[:3])}) mm: the middle of the segmented object.")
    return ("<section><h2>Segmentation</h2>\n" + _table(["Class", "Label", "Voxels", "Volume (mL)"], rows, (1, 2, 3))
            + _figure(segmentation_png, "Segmentation in the class colours over the scan", caption) + "</section>")


def _voxels(count: Any) -> str:
    """A voxel count with thousands separators (7,057,124)."""
    return f"{count:,}" if isinstance(count, int) and not isinstance(count, bool) else html.escape(str(count))


def _truth(summary: dict[str, Any]) -> str:
    """The segmentation's Dice against the ground truth given to the run (``summary["truth"]``), if any."""
    truth = summary.get("truth") or {}
    if not truth.get("dice"):
        return ""
    groups = summary.get("groups") or {}
    rows = [[html.escape(name) + (" <i>(group)</i>" if name in groups else ""), _format(value)]
            for name, value in truth["dice"].items()]
    source = f" ({html.escape(str(truth['label']))})" if truth.get("label") else ""
    return ("<section><h2>Against the known label</h2>\n"
            f"<p>This run was given the true outline{source}. Dice measures how well the model's outline "
            "matches it: 1 = identical, 0 = no overlap. The scores and the verdict above do not use it.</p>\n"
            + _table(["Class", "Dice"], rows, (1,)) + "</section>")


def _maps(maps: Sequence[dict[str, Any]], montages: Sequence[Path]) -> str:
    if not maps:
        return ""
    cards = []
    for item, png in zip(maps, montages):
        title = map_title(item["method"], item.get("variant"))
        title = title[:1].upper() + title[1:]
        lo, hi = item["range"]
        scale = ("scaled to 0 to 1 for display: compare values within this map only" if item.get("normalised")
                 else "in the method's own units")
        seconds = item.get("seconds")
        facts = {
            "Value range": f"{readable_range(lo, hi)} ({scale})",
            "Shown above": f"{item.get('threshold', 0):.0%} of the range (colour map {item.get('colormap', '?')})",
            "Computed in": "?" if seconds is None else f"{seconds:.1f} s (the whole method)",
            "File": item["file"],
        }
        heading = f"{html.escape(title)} <small>{html.escape(str(item.get('class', '')))}</small>"
        details = "".join(f"<dt>{k}</dt><dd>{html.escape(v)}</dd>" for k, v in facts.items())
        cards.append(f"<article class=\"card\"><h3>{heading}</h3>\n"
                     f"{_figure(png, title, item.get('description', ''))}<dl>{details}</dl></article>")
    return "<section><h2>Maps</h2>\n" + "\n".join(cards) + "</section>"


def _sequence_section(summary: dict[str, Any], folder: Path, target: str) -> str:
    """The ``sequences`` method's shares per input sequence as bars, with the numbers behind them."""
    explanation = next((e for e in summary.get("explanations", []) if e.get("method") == "sequences"), None)
    if explanation is None:
        return ""
    names = list((explanation.get("metadata") or {}).get("sequences") or [])
    scalars = explanation.get("scalars") or {}
    shares = {words: [float(scalars.get(f"{key}.{name}", 0.0)) for name in names]
              for key, words in SEQUENCE_SHARES.items() if any(f"{key}.{name}" in scalars for name in names)}
    png = render_sequence_shares(names, shares, folder / SEQUENCES_PICTURE, target)
    rows = [[html.escape(name), f"{scalars.get(f'occlusion_logit_drop.{name}', float('nan')):.2f}",
             f"{scalars.get(f'occlusion_dice.{name}', float('nan')):.2f}",
             f"{100 * scalars.get(f'ig_share.{name}', float('nan')):.0f} %"] for name in names]
    caption = ("How much the segmentation relied on each scan. Hiding a scan (its voxels inside the head set to their "
               "mean) lowers the model's confidence in the target by the drop shown (log-odds summed over the "
               "target) and changes its outline (Dice with the outline seen with every scan: 1 = unchanged); "
               "integrated gradients split the target's evidence between the scans.")
    return ("<section><h2>Which scan drove the segmentation</h2>\n" + _figure(png, "share per sequence", caption)
            + _table(["Sequence", "Drop in confidence when hidden", "Dice when hidden", "Integrated-gradients share"],
                     rows, (1, 2, 3)) + "</section>")


def _sa_section(sa: dict[str, Any], png: Path) -> str:
    against = ("the ground truth" if (sa.get("metadata") or {}).get("reference") == "label"
               else "the model's own segmentation (no ground truth was given)")
    caption = (f"Each point is one layer of the network, from the input (left) to the output (right). Its score "
               f"is the overlap (Dice) between {against} and a segmentation made from that layer's features alone "
               f"by the ProtoSeg prototype method: 1 = the layer alone already separates the object perfectly. "
               f"The mean over the units of the last two layers is the case score \u03bc above.")
    return ("<section><h2>Segmentation ability per layer</h2>\n" + _figure(png, "SA score per layer", caption)
            + "</section>")


def _not_applicable(reasons: dict[str, str]) -> str:
    if not reasons:
        return ""
    items = "".join(f"<li><b>{html.escape(method_name(m))}</b>: {html.escape(r)}</li>" for m, r in reasons.items())
    return f"<section><h2>Methods that did not apply</h2>\n<ul>{items}</ul></section>"


def _timings(summary: dict[str, Any], report_seconds: float) -> str:
    steps = {stage.replace("_", " "): s for stage, s in (summary.get("seconds") or {}).items()}
    steps |= {method_name(e["method"]): (e.get("metadata") or {}).get("seconds")
              for e in summary.get("explanations", [])}
    steps["drawing this report"] = report_seconds
    rows = [[html.escape(k), "?" if v is None else f"{v:.1f}"] for k, v in steps.items()]
    return "<section><h2>Timings</h2>\n" + _table(["Step", "Seconds"], rows, (1,)) + "</section>"


def _glossary(sections: Sequence[str], n_classes: int) -> str:
    """Each unit and term that the page's ``sections`` use, explained once (:data:`SegXAILib.glossary.TERMS`)."""
    words = html.unescape(re.sub(r"<(script|style)\b.*?</\1>|<[^>]+>|data:[^\"]+", " ", "\n".join(sections),
                                 flags=re.S))
    n_classes = max(2, n_classes)
    items = "".join(f"<dt>{html.escape(term.term)}</dt><dd>"
                    f"{html.escape(term.meaning.format(classes=n_classes, max_entropy=math.log(n_classes)))}</dd>"
                    for term in terms_used(words))
    return f"<section><h2>Words and units on this page</h2>\n<dl>{items}</dl></section>" if items else ""


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = ()) -> str:
    """A table of cells that are already HTML; the ``numeric`` columns right-aligned."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td class=\"num\">{c}</td>" if n in numeric else f"<td>{c}</td>"
                                     for n, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>\n"


def _figure(png: Path, alt: str, caption: str) -> str:
    """A picture embedded as a data URI, so the page needs no other file."""
    return (f"<figure><img alt=\"{html.escape(alt)}\" src=\"{_data_uri(png)}\">"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>\n")


def _data_uri(png: Path) -> str:
    """A PNG file as a ``data:`` URI."""
    return "data:image/png;base64," + base64.b64encode(Path(png).read_bytes()).decode("ascii")


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1100px;margin:1.5em auto;
padding:0 1em;color:#1d1d1f;line-height:1.45}
h1{margin:.2em 0}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
h3 small{color:#666;font-weight:normal}
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em;margin:.6em 0}
dt{font-weight:600;color:#444}dd{margin:0}
table{border-collapse:collapse;width:100%;margin:.6em 0}
th,td{border:1px solid #ccc;padding:.35em .5em;vertical-align:top;text-align:left}th{background:#f2f2f2}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.review td{background:#fff1f0}code{font-size:.85em;color:#555}
.flag{background:#c62828;color:#fff;border-radius:3px;padding:0 .35em;font-weight:600;white-space:nowrap}
.verdict{padding:.6em .8em;border-radius:4px}.verdict.review{background:#fff1f0;border:1px solid #c62828}
.verdict.ok{background:#f1f8f1;border:1px solid #2e7d32}
.verdict.incomplete{background:#fff8e1;border:1px solid #f9a825}
.swatch{display:inline-block;width:.9em;height:.9em;margin-right:.4em;border:1px solid #888;vertical-align:middle}
.card{border:1px solid #ddd;border-radius:6px;padding:.4em 1em;margin:1em 0}
figure{margin:.6em 0}img{max-width:100%;height:auto}figcaption{color:#444;font-size:.9em}
footer{margin-top:2em;color:#777;font-size:.8em}
"""
