"""``segxai demo``: a synthetic lesion in a packaged brain MRI, segmented, explained and scored against its label."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .case import run_explain
from .data.lesion import synthesize_lesion, write_case
from .data.samples import default_demo_host, read_host
from .fileio import OutputFolder, check_output_folder
from .models.card import ModelCard
from .models.registry import resolve_card
from .progress import Progress


@dataclass
class DemoResult:
    """What the demo did: the case it made, the explain run's summary and the Dice against the known label
    (``summary["truth"]["dice"]``, as the explain run of a case with a label records it)."""

    host: str
    card: ModelCard
    summary: dict[str, Any]
    dice: dict[str, float]
    image: Path
    label: Path


def run_demo(out: Path, host: str | None, seed: int, model: str, methods: str, device: str,
             progress: Progress) -> DemoResult:
    """Place lesion ``seed`` in ``host`` (default: Colin27 when installed, else MNI152), write the case to
    ``out/case``, explain it into ``out`` with the lesion's label as the ground truth (the run scores the
    segmentation against it: ``summary["truth"]``).

    Both folders are published whole (:class:`~SegXAILib.fileio.OutputFolder`); ``out`` is checked first."""
    check_output_folder(out)  # before the lesion is drawn; run_explain checks the rest
    host_name = host or default_demo_host()
    with OutputFolder(out / "case", inputs=[host], claims=("image.nii.gz", "label.nii.gz")) as staged:
        case = synthesize_lesion(read_host(host_name), seed=seed)
        write_case(case, staged.staging, fmt="nii.gz")
    image_path, label_path = out / "case" / "image.nii.gz", out / "case" / "label.nii.gz"
    summary = run_explain(str(image_path), model, methods, None, out, device, "nii.gz", progress,
                          label_path=str(label_path))
    return DemoResult(host_name, resolve_card(model), summary, summary["truth"]["dice"], image_path, label_path)
