"""What a case writes: the labelmap, one file per map on the scan's grid, and ``summary.json``.

Writing only records: the segmentation, the explanations and the verdict are computed before
(:mod:`SegXAILib.case`), and everything goes into a staging folder published when complete.
"""

from __future__ import annotations

import json
import platform
import re
import time
from typing import Any

import numpy as np

from .explain.base import ExplanationMap
from .explain.pipeline import ExplainResult
from .fileio import OutputFolder, summary_files
from .inference import SegmentationResult, volumes_ml
from .models.card import PALETTE, ModelCard
from .preprocessing import resample_to_grid
from .report.display import display_range, head_mask
from .verdict import CaseVerdict
from .version import __version__
from .volume import Volume, write_volume


def segment_claims(fmt: str) -> tuple[str, ...]:
    """Every file ``segxai segment`` may write (:class:`~SegXAILib.fileio.OutputFolder`'s ``claims``)."""
    return (f"segmentation.{fmt}", "classes/*", "summary.json")


def explain_claims(fmt: str) -> tuple[str, ...]:
    """Every file ``segxai explain`` may write: the segmentation, the maps, the summary and the report."""
    return (*segment_claims(fmt), "maps/*", "report.html", "report/*")


def listed_files(summary: dict[str, Any]) -> list[str]:
    """The files a summary lists (:func:`~SegXAILib.fileio.summary_files`); for an explain summary without a
    ``report`` entry (written before it existed, or with ``--no-report``, a report perhaps drawn from it later),
    the report's files as :func:`SegXAILib.report.write_report` names them."""
    files = summary_files(summary)
    if "report" not in summary and summary.get("maps") is not None:
        from .report.html import report_files  # matplotlib: only when an earlier summary is read

        files += report_files(summary)
    return files


def write_summary(out: OutputFolder, summary: dict[str, Any]) -> None:
    """``summary.json`` in the staging folder (published last, :class:`~SegXAILib.fileio.OutputFolder`)."""
    out.path("summary.json").write_text(json.dumps(summary, indent=2, default=_json_default) + "\n",
                                        encoding="utf-8")


def versions() -> dict[str, str]:
    import monai
    import SimpleITK
    import torch

    return {"segxai": __version__, "torch": torch.__version__, "monai": monai.__version__,
            "SimpleITK": SimpleITK.Version_VersionString(), "python": platform.python_version()}


def segmentation_summary(result: SegmentationResult, card: ModelCard, scan_path: str | list[str], files: dict[str, Any],
                         timings: dict[str, float]) -> dict[str, Any]:
    """The summary.json contract: model, model grid, classes, per-class voxel counts and mL, timings, device."""
    counts = (volumes_ml(result.labels, [c.label for c in card.classes]) if not result.masks else
              {c.label: volumes_ml(mask, [1])[1] for c, mask in zip(card.classes, result.masks)})
    return {
        "input": str(scan_path) if isinstance(scan_path, str) else [str(path) for path in scan_path],
        **({"sequences": card.sequence_names} if card.input_channels > 1 else {}),
        **({"resampled": {"onto": card.sequence_names[0], "scans": [card.sequence_names[n] for n in result.resampled],
                          "how": "linear interpolation onto the first scan's grid"}} if result.resampled else {}),
        "model": {"name": card.name, "architecture": card.architecture.get("name"),
                  **({"inference": card.inference} if card.inference else {}), "validation": card.validation,
                  **({"intended_use": card.intended_use} if card.intended_use else {}),
                  **({"limitations": card.limitations} if card.limitations else {})},
        # the grid the network saw (its spacing differs from the card's when scaled to the brain's size)
        "model_grid": {"shape_ijk": list(result.model_grid.shape[::-1]),
                       "spacing_mm": [round(float(s), 4) for s in result.model_grid.spacing]},
        "classes": [{"name": c.name, "label": c.label, "color": list(c.color),
                     "voxels": counts[c.label][0], "volume_ml": round(counts[c.label][1], 4),
                     **({"file": files["classes"][c.name]} if c.name in files.get("classes", {}) else {})}
                    for c in card.classes],
        **({"labelmap": labelmap_summary(result, card)} if result.masks else {}),
        "groups": {g: {"labels": labels, "voxels": sum(counts[v][0] for v in labels),
                       "volume_ml": round(sum(counts[v][1] for v in labels), 4)}
                   for g, labels in card.groups.items()},
        "files": {key: value for key, value in files.items() if key != "classes"},
        "seconds": {k: round(v, 3) for k, v in timings.items()},
        "device": result.device,
        "versions": versions(),
    }


def labelmap_summary(result: SegmentationResult, card: ModelCard) -> dict[str, Any]:
    """What the single label map of a multi-label model holds: the model's own values (a MONAI bundle's mapping,
    named by the card's ``labelmap``) or, without one, each voxel's last class."""
    values = [int(v) for v in np.unique(result.labels.array) if v != 0]
    counts = volumes_ml(result.labels, values) if values else {}
    by_label = {c.label: c.name for c in card.classes}
    names = card.labelmap or (by_label if not card.extra.get("bundle_root") else {})
    return {"rule": "the model's own label map (its postprocessing)" if card.extra.get("bundle_root")
            else "each voxel holds the label of its last class; each class's own file holds all of it",
            "values": [{"value": v, "name": names.get(v, f"label {v}"), "voxels": counts[v][0],
                        "volume_ml": round(counts[v][1], 4), "color": list(PALETTE[n % len(PALETTE)])}
                       for n, v in enumerate(values)]}


def write_segmentation_files(out: OutputFolder, result: SegmentationResult, card: ModelCard,
                             fmt: str) -> dict[str, Any]:
    """Write ``segmentation.<fmt>`` and, for a multi-label model, one 0/1 file per class (``classes/<name>.<fmt>``:
    overlapping classes); return the ``files`` entry (``classes``: class name -> file)."""
    files: dict[str, Any] = {"segmentation": f"segmentation.{fmt}"}
    write_volume(result.labels, out.path(files["segmentation"]))
    if result.masks:
        files["classes"] = {c.name: f"classes/{slug(c.name)}.{fmt}" for c in card.classes}
        for c, mask in zip(card.classes, result.masks):
            write_volume(mask, out.path(files["classes"][c.name]))
    return files


def write_segmentation(out: OutputFolder, result: SegmentationResult, card: ModelCard, scan_path: str | list[str],
                       fmt: str, timings: dict[str, float]) -> dict[str, Any]:
    """Write the segmentation (:func:`write_segmentation_files`) and ``summary.json`` into the staging folder; return
    the summary. The seconds spent writing the labels are recorded as ``write`` beside ``timings``.
    """
    start = time.perf_counter()
    files = write_segmentation_files(out, result, card, fmt)
    timings = {**timings, "write": time.perf_counter() - start}
    summary = segmentation_summary(result, card, scan_path, files, timings)
    write_summary(out, summary)
    return summary



def slug(text: str) -> str:
    """A file-name-safe form of a class name: 'whole tumour' -> 'whole-tumour'."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def map_on_scan(item: ExplanationMap, result: SegmentationResult) -> Volume:
    """A map on the scan's grid; min-max scaled to [0, 1] when the map has no units."""
    volume = resample_to_grid(result.model_grid.with_array(item.array.astype(np.float32)), result.scan)
    array = volume.array
    if item.normalise:
        lo, hi = float(array.min()), float(array.max())
        array = (array - lo) / (hi - lo) if hi > lo else np.zeros_like(array)
    return volume.with_array(array.astype(np.float32))


def map_stem(item: ExplanationMap, target: str) -> str:
    """A map's file name without its extension: ``gradcam_whole-tumour``."""
    return f"{item.name}_{slug(target)}"


def map_entry(method: str, item: ExplanationMap, target: str) -> dict[str, Any]:
    """What describes a map in ``summary.json`` (and what :func:`~SegXAILib.report.display.display_range` reads),
    apart from its file, value range and timing."""
    return {"method": method, "variant": item.variant, "class": target, "description": item.description,
            "colormap": item.colormap, "threshold": item.threshold, "normalised": item.normalise,
            **({"layer": item.layer} if item.layer else {})}


def write_explain_outputs(out: OutputFolder, run: ExplainResult, verdict: CaseVerdict, card: ModelCard,
                          scan_path: str | list[str], fmt: str, timings: dict[str, float],
                          record: dict[str, Any] | None = None, label_path: str | None = None) -> dict[str, Any]:
    """Write the segmentation, one file per map on the scan's grid, and summary.json (staged); return the summary.

    summary.json records the case-level ``scores`` (with ``reliability`` when a reliability model judged the
    case), the ``review`` verdict and the uncertainty ``agreement`` of ``verdict``
    (:func:`SegXAILib.verdict.judge_case`), and as ``run`` the model, methods and options it was explained
    with (``record``, :func:`SegXAILib.case.run_record`). A case judged against a ground truth records it as
    ``truth``: ``{"label": label_path, "dice": {class or group: Dice}}``.
    """
    result = run.segmentation
    files = write_segmentation_files(out, result, card, fmt)
    maps = []
    head = head_mask(result.scan.array) if any(e.maps for e in run.explanations) else None  # for the display ranges
    for explanation in run.explanations:
        for item in explanation.maps:
            relative = f"maps/{map_stem(item, run.target)}.{fmt}"
            volume = map_on_scan(item, result)
            write_volume(volume, out.path(relative))
            maps.append({"file": relative, **map_entry(explanation.method, item, run.target),
                         "range": [float(volume.array.min()), float(volume.array.max())],
                         "seconds": explanation.metadata.get("seconds")})
            maps[-1]["display"] = display_range(volume.array, head, maps[-1]).to_json()  # one rule for every viewer
            del volume
    summary = segmentation_summary(result, card, scan_path, files, timings)
    summary.update({
        **({"run": record} if record is not None else {}),
        "target": {"name": run.target, "labels": run.label_values},
        "maps": maps,
        "explanations": [{"method": e.method, "scalars": e.scalars, "curves": e.curves, "metadata": e.metadata}
                         for e in run.explanations],
        "not_applicable": {**run.not_applicable, **verdict.not_applicable},
        "scores": verdict.scores,
    })
    if verdict.reliability_model is not None:
        summary["reliability_model"] = verdict.reliability_model
    summary["review"] = verdict.review  # the one verdict the report and Slicer show
    if verdict.agreement:
        summary["agreement"] = verdict.agreement
    if verdict.dice:
        summary["truth"] = {"label": label_path, "dice": verdict.dice}
    write_summary(out, summary)
    return summary


def _json_default(value: Any) -> Any:
    """NumPy scalars and arrays in explainer metadata become plain JSON."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
