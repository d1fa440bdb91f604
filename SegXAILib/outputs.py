"""What a segmentation run writes: the labelmap and ``summary.json``."""

from __future__ import annotations

import json
import platform
import time
from typing import Any

from . import __version__
from .fileio import OutputFolder
from .inference import SegmentationResult, volumes_ml
from .models.card import ModelCard
from .volume import write_volume

FORMATS = ("nii.gz", "nrrd", "nii", "mha")


def versions() -> dict[str, str]:
    import monai
    import SimpleITK
    import torch

    return {"segxai": __version__, "torch": torch.__version__, "monai": monai.__version__,
            "SimpleITK": SimpleITK.Version_VersionString(), "python": platform.python_version()}


def segmentation_summary(result: SegmentationResult, card: ModelCard, scan_path: str, files: dict[str, str],
                         timings: dict[str, float]) -> dict[str, Any]:
    """The summary.json contract: model, model grid, classes, per-class voxel counts and mL, timings, device."""
    counts = volumes_ml(result.labels, [c.label for c in card.classes])
    return {
        "input": str(scan_path),
        "model": {"name": card.name, "architecture": card.architecture.get("name"),
                  **({"inference": card.inference} if card.inference else {}), "validation": card.validation},
        # the grid the network saw (its spacing differs from the card's when scaled to the brain's size)
        "model_grid": {"shape_ijk": list(result.model_grid.shape[::-1]),
                       "spacing_mm": [round(float(s), 4) for s in result.model_grid.spacing]},
        "classes": [{"name": c.name, "label": c.label, "color": list(c.color),
                     "voxels": counts[c.label][0], "volume_ml": round(counts[c.label][1], 4)}
                    for c in card.classes],
        "groups": {g: {"labels": labels, "voxels": sum(counts[v][0] for v in labels),
                       "volume_ml": round(sum(counts[v][1] for v in labels), 4)}
                   for g, labels in card.groups.items()},
        "files": files,
        "seconds": {k: round(v, 3) for k, v in timings.items()},
        "device": result.device,
        "versions": versions(),
    }


def write_segmentation(out: OutputFolder, result: SegmentationResult, card: ModelCard, scan_path: str,
                       fmt: str, timings: dict[str, float]) -> dict[str, Any]:
    """Write ``segmentation.<fmt>`` and ``summary.json`` into the staging folder; return the summary.

    The seconds spent writing the labels are recorded as ``write`` beside ``timings``.
    """
    seg_name = f"segmentation.{fmt}"
    start = time.perf_counter()
    write_volume(result.labels, out.path(seg_name))
    timings = {**timings, "write": time.perf_counter() - start}
    summary = segmentation_summary(result, card, scan_path, {"segmentation": seg_name}, timings)
    out.path("summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary

