"""One case, from scan to verdict: load -> segment -> explain -> judge -> write.

The one home of running a case: ``segxai segment``, ``segxai explain``, ``segxai demo``, the audit's
tasks and the Slicer module (which runs ``segxai explain`` in a child process) all come through here.
:func:`explain_case` computes and writes nothing; :func:`run_explain` adds reading and writing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import SegXAIError
from .explain.pipeline import ExplainResult, explain_segmentation
from .fileio import OutputFolder
from .inference import SegmentationResult, segment, select_device
from .methods import check_options, get_explainer, parse_methods
from .models.card import ModelCard
from .models.loaders import LoadedModel
from .models.registry import load_model, model_fingerprint
from .outputs import (
    explain_claims,
    listed_files,
    segment_claims,
    write_explain_outputs,
    write_segmentation,
    write_summary,
)
from .progress import Progress
from .verdict import CaseVerdict, judge_case
from .volume import Volume, read_volume


@dataclass
class CaseResult:
    """An explained and judged case: the segmentation and its explanations (``run``), the ``verdict``, and the
    ``card`` of the model that made them (its classes name and colour the labels)."""

    run: ExplainResult
    verdict: CaseVerdict
    card: ModelCard

    @property
    def segmentation(self) -> SegmentationResult:
        return self.run.segmentation

    def show(self, height: int = 480) -> Any:
        """The scan, the segmentation and every map in an interactive viewer for a Jupyter notebook (an
        ``ipyniivue.NiiVue`` widget; needs ``pip install 'segxai[notebook]'``): :func:`SegXAILib.notebook.show_case`."""
        from .notebook import show_case  # ipyniivue: only when a case is shown

        return show_case(self.run, self.card, height)


def explain_case(scan: Volume | list[Volume], model: LoadedModel, methods: list[str], target: str | None = None,
                 device: str | torch.device = "auto", progress: Progress | None = None,
                 label: Volume | None = None, options: dict[str, Any] | None = None) -> CaseResult:
    """Segment ``scan``, explain ``target`` with each method and judge the case; nothing is written.

    Args:
        scan: the scan as read (:func:`SegXAILib.volume.read_volume`); for a model of several sequences, one
            co-registered scan per sequence in the model's order (the results are on the first one's grid).
        methods: registry names, e.g. ``["gradcam", "tta"]`` (:func:`~SegXAILib.methods.parse_methods`).
        target: class or group name; ``None``: the card's default target.
        label: ground truth on the scan's grid (optional).
        options: ``{"gradcam": {"layer": "bottleneck"}}``; checked before any work.

    Raises:
        SegXAIError: an unknown target, method or option, or a label on another grid, before the model runs.
    """
    progress = progress or Progress()
    options = check_options(options or {}, methods)
    model.card.target_channels(target)
    if label is not None and not label.same_grid(scan if isinstance(scan, Volume) else scan[0], atol=1e-3):
        raise SegXAIError("the label file is not on the scan's grid (shape, spacing, origin or direction "
                          "differ); give the label that belongs to this scan")
    device = device if isinstance(device, torch.device) else select_device(device)
    segmentation = segment(scan, model, device=device, progress=progress)
    explainers = [get_explainer(name) for name in methods]
    run = explain_segmentation(segmentation, model, explainers, target, device, progress, label, options)
    return CaseResult(run, judge_case(run, model.card, label), model.card)


def run_record(card: ModelCard, methods: list[str], options: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a case was explained with, as ``summary["run"]`` records it: the model (name and
    :func:`~SegXAILib.models.registry.model_fingerprint` of card and weights), the methods, and every
    method's options with their defaults filled in (JSON values). An audit resumes a case only when its
    record equals the audit's."""
    parsed = check_options(options or {}, methods)
    return json.loads(json.dumps({
        "model": card.name, "model_sha256": model_fingerprint(card), "methods": list(methods),
        "options": {name: asdict(parsed[name]) for name in methods}}, default=str))


def run_segment(scan_path: str | list[str], model_spec: str, out_dir: Path, device: str, fmt: str,
                progress: Progress, trust_model_code: bool = False) -> dict[str, Any]:
    """Read, segment and write ``segmentation.<fmt>`` and ``summary.json``; return the summary.

    The output folder is checked (and the scan refused where the run would write) before anything is read.
    ``trust_model_code``: see :func:`~SegXAILib.models.registry.load_model`.
    """
    start = time.perf_counter()
    paths = [scan_path] if isinstance(scan_path, str) else list(scan_path)
    with OutputFolder(out_dir, inputs=paths, claims=segment_claims(fmt), listed=listed_files) as out:
        scan = [read_volume(path) for path in paths]
        model = load_model(model_spec, trust_model_code=trust_model_code)
        load_seconds = time.perf_counter() - start
        result = segment(scan, model, device=device, progress=progress)
        return write_segmentation(out, result, model.card, _input(paths), fmt,
                                  {"read_and_load": load_seconds, **result.timings})


def _input(paths: list[str]) -> str | list[str]:
    """The summary's ``input``: the scan's path, or the list of them (one per sequence)."""
    return paths[0] if len(paths) == 1 else paths


def run_explain(scan_path: str | list[str], model_spec: str, methods: str, target: str | None, out_dir: Path,
                device: str, fmt: str, progress: Progress, label_path: str | None = None,
                options: dict[str, Any] | None = None, report: bool = True,
                trust_model_code: bool = False) -> dict[str, Any]:
    """Read, segment, explain, judge and write (and draw ``report.html``); return the summary.

    The output folder is checked (and inputs refused where the run would write) before anything is read;
    everything, the report included, is drawn in its staging folder and published together
    (:class:`~SegXAILib.fileio.OutputFolder`).
    """
    start = time.perf_counter()
    names = parse_methods(methods)
    options = check_options(options or {}, names)  # a typo fails before anything is read; parsed once
    paths = [scan_path] if isinstance(scan_path, str) else list(scan_path)
    with OutputFolder(out_dir, inputs=[*paths, label_path], claims=explain_claims(fmt),
                      listed=listed_files) as out:
        scan = [read_volume(path) for path in paths]
        label = read_volume(label_path) if label_path else None
        model = load_model(model_spec, trust_model_code=trust_model_code)
        load_seconds = time.perf_counter() - start
        case = explain_case(scan, model, names, target, device, progress, label, options)
        summary = write_explain_outputs(out, case.run, case.verdict, model.card, _input(paths), fmt,
                                        {"read_and_load": load_seconds, **case.segmentation.timings},
                                        run_record(model.card, names, options), label_path)
        if report:
            from .report import write_report

            progress.update("report", 0.0)
            write_report(out.staging)  # reads the staged summary.json and the files it names
            summary["report"] = [f for f in out.staged() if f == "report.html" or f.startswith("report/")]
            write_summary(out, summary)  # now listing the report's files too
            progress.update("report", 1.0)
    return summary
