"""Explain one scan: segment once, run each explainer, bring every map to the scan's grid, write.

This is the single code path behind ``segxai explain``, ``segxai demo`` and the Slicer module
(which runs the command in a child process and reads back ``summary.json``).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import SegXAIError
from ..fileio import OutputFolder
from ..image_quality import image_quality
from ..inference import SegmentationResult, segment, select_device
from ..models.loaders import LoadedModel
from ..outputs import segmentation_summary
from ..preprocessing import foreground_mask, resample_to_grid
from ..progress import Progress
from ..quality import review_case
from ..reliability import apply_reliability
from ..volume import Volume, write_volume
from ..uncertainty.collaboration import agreement
from .base import ExplainContext, Explanation, ExplanationMap, NotApplicable
from .registry import get_explainer


@dataclass
class ExplainResult:
    """A segmentation, the explanations of one target, and the methods that did not apply."""

    segmentation: SegmentationResult
    target: str
    channels: list[int]
    label_values: list[int]
    explanations: list[Explanation] = field(default_factory=list)
    not_applicable: dict[str, str] = field(default_factory=dict)


def slug(text: str) -> str:
    """A file-name-safe form of a class name: 'whole tumour' -> 'whole-tumour'."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def target_mask_on_grid(label: Volume, grid: Volume, model: LoadedModel, channels: list[int]) -> np.ndarray:
    """Ground truth of the target (label values of ``channels``) on the model grid, bool (D, H, W)."""
    values = [model.card.classes[c].label for c in channels]
    on_grid = resample_to_grid(label, grid, interpolation="nearest").array
    return np.isin(on_grid, values)


def explain_scan(scan: Volume, model: LoadedModel, methods: list[str], target: str | None = None,
                 device: str | torch.device = "auto", progress: Progress | None = None,
                 label: Volume | None = None, options: dict[str, dict[str, Any]] | None = None) -> ExplainResult:
    """Segment ``scan`` and explain ``target`` with each method (maps stay on the model grid)."""
    progress = progress or Progress()
    device = device if isinstance(device, torch.device) else select_device(device)
    target_name, channels = model.card.target_channels(target)
    explainers = [get_explainer(name) for name in methods]
    result = segment(scan, model, device=device, progress=progress)
    run = ExplainResult(result, target_name, channels, [model.card.classes[c].label for c in channels])
    if label is not None and not label.same_grid(scan, atol=1e-3):
        raise SegXAIError("the label file is not on the scan's grid (shape, spacing, origin or direction "
                          "differ); give the label that belongs to this scan")
    context = ExplainContext(
        model=model, image=torch.from_numpy(np.ascontiguousarray(result.model_grid.array))[None, None],
        target=target_name, channels=channels, probabilities=result.probabilities, device=device,
        progress=progress, options=options or {},
        label=None if label is None else target_mask_on_grid(label, result.model_grid, model, channels))
    for explainer in explainers:
        try:
            explainer.check_applicable(model)
            start = time.perf_counter()
            explanation = explainer.explain(context)
            explanation.metadata.setdefault("seconds", round(time.perf_counter() - start, 3))
            run.explanations.append(explanation)
        except NotApplicable as reason:
            run.not_applicable[explainer.name] = str(reason)
    model.network.to("cpu")
    return run


def map_on_scan(item: ExplanationMap, result: SegmentationResult) -> Volume:
    """A map on the scan's grid; min-max scaled to [0, 1] when the map has no units."""
    volume = resample_to_grid(result.model_grid.with_array(item.array.astype(np.float32)), result.scan)
    array = volume.array
    if item.normalise:
        lo, hi = float(array.min()), float(array.max())
        array = (array - lo) / (hi - lo) if hi > lo else np.zeros_like(array)
    return volume.with_array(array.astype(np.float32))


def case_scores(run: ExplainResult) -> dict[str, Any]:
    """Case-level quality scores: mean SA mu, mean uncertainty inside the object, object volume, and the
    scan's acquisition quality (:func:`SegXAILib.image_quality.image_quality`, as ``image.<name>``).

    Explainers report scalars; those named ``mean_sa`` or ``*_inside`` (a mean inside the predicted
    object) are case-level scores and are collected here as ``<method>.<name>``.
    """
    labels = run.segmentation.labels
    voxels = int(np.isin(labels.array, run.label_values).sum())
    scores: dict[str, Any] = {"object_volume_ml": round(voxels * float(np.prod(labels.spacing)) / 1000, 4)}
    scan = run.segmentation.scan
    scores |= {f"image.{name}": value if np.isfinite(value) else None  # None: JSON null, not NaN
               for name, value in image_quality(scan.array, scan.spacing).items()}
    for explanation in run.explanations:
        for key, value in explanation.scalars.items():
            if key == "mean_sa" or key.endswith("_inside"):
                scores[f"{explanation.method}.{key}"] = value
    return scores


SAMPLED_UNCERTAINTY = ("ensemble", "mcdropout", "tta")
"""Methods whose entropy and variance maps the collaboration-gradient map is compared with."""


def comparison_region(grid: Volume, card_modality: str) -> tuple[np.ndarray, str]:
    """Where uncertainty maps are compared: the brain of a brain MRI, else the scan's foreground.

    Paper 000 compares inside the brain; elsewhere the body (Otsu foreground) plays that part.
    """
    if card_modality.upper().startswith("MRI"):
        from ..data.brain_mask import estimate_brain_mask

        mask = estimate_brain_mask(grid)
        if mask.any():
            return mask, "brain (estimated mask)"
    return foreground_mask(grid.array), "foreground (Otsu)"


def uncertainty_agreement(run: ExplainResult, card_modality: str) -> dict[str, Any]:
    """Agreement of the collaboration-gradient map with every sampled entropy and variance map of the run.

    The validation of paper 000 (its Pearson: 0.6175 with ensemble entropy, 0.5651 with variance):
    Pearson inside the brain and the overlap of the top-10 % voxels (:func:`agreement`).
    Returns ``{}`` unless ``mhex-uncertainty`` and at least one of :data:`SAMPLED_UNCERTAINTY` ran.
    """
    collaboration = next((m.array for e in run.explanations if e.method == "mhex-uncertainty" for m in e.maps), None)
    others = {f"{e.method}-{m.variant}": m.array for e in run.explanations if e.method in SAMPLED_UNCERTAINTY
              for m in e.maps if m.variant in ("entropy", "variance")}
    if collaboration is None or not others:
        return {}
    region, region_name = comparison_region(run.segmentation.model_grid, card_modality)
    return {"map": "mhex-uncertainty", "region": region_name, "region_voxels": int(region.sum()),
            "against": {name: agreement(collaboration, other, region) for name, other in others.items()}}


def write_explain_outputs(out: OutputFolder, run: ExplainResult, model: LoadedModel, scan_path: str,
                          fmt: str, timings: dict[str, float]) -> dict[str, Any]:
    """Write the segmentation, one file per map on the scan's grid, and summary.json (staged).

    summary.json carries the case-level ``scores`` (with ``reliability`` when a reliability model lies
    beside the model card, :func:`SegXAILib.reliability.apply_reliability`) and, judged by the model card's
    thresholds, whether the case needs ``review`` (:func:`SegXAILib.quality.review_case`).
    """
    result = run.segmentation
    files = {"segmentation": f"segmentation.{fmt}"}
    write_volume(result.labels, out.path(files["segmentation"]))
    maps = []
    for explanation in run.explanations:
        for item in explanation.maps:
            relative = f"maps/{item.name}_{slug(run.target)}.{fmt}"
            volume = map_on_scan(item, result)
            write_volume(volume, out.path(relative))
            maps.append({"file": relative, "method": explanation.method, "variant": item.variant,
                         "class": run.target, "description": item.description, "colormap": item.colormap,
                         "threshold": item.threshold, "normalised": item.normalise,
                         "range": [float(volume.array.min()), float(volume.array.max())],
                         "seconds": explanation.metadata.get("seconds")})
            del volume
    summary = segmentation_summary(result, model.card, scan_path, files, timings)
    summary.update({
        "target": {"name": run.target, "labels": run.label_values},
        "maps": maps,
        "explanations": [{"method": e.method, "scalars": e.scalars, "curves": e.curves, "metadata": e.metadata}
                         for e in run.explanations],
        "not_applicable": run.not_applicable,
        "scores": case_scores(run),
    })
    apply_reliability(summary, model.card)  # its features are the summary's: the scores and MiSuRe's scalars
    summary["review"] = review_case(summary, model.card.review)  # the one verdict the report and Slicer show
    comparison = uncertainty_agreement(run, model.card.modality)
    if comparison:
        summary["agreement"] = comparison
    out.path("summary.json").write_text(json.dumps(summary, indent=2, default=_json_default) + "\n", encoding="utf-8")
    return summary


def _json_default(value: Any) -> Any:
    """NumPy scalars and arrays in explainer metadata become plain JSON."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
