"""Faithfulness of any saliency map: does the part of the scan that a map ranks first carry the decision?

Every metric perturbs the scan on the model grid and compares the model's prediction on the perturbed
scan with its prediction on the scan itself (the *reference*). A voxel that is removed, or not kept,
takes the baseline value b (default 0 in normalised intensity units, as MiSuRe; ``"min"``: the scan's
minimum, e.g. air; score MiSuRe's maps with the baseline they were made with). Target masks are
argmax masks: the argmax is one of the target's channels.

(a) Binarised maps, the protocol of Hasany et al.'s Table 1. The map is min-max scaled to [0, 1] and
    binarised, keep = map > t for each threshold t (default 0, i.e. any non-zero value, as the paper
    takes MiSuRe's MSR; 0.05 and 0.1 as for Seg-Grad-CAM; 0.2 and 0.4 as for RISE), or keep = the
    top-q fraction of the grid's voxels (q in ``top_fractions``); X_keep = X_0 where kept, b elsewhere:

        dice_explained     = Dice(target mask of f(X_keep), target mask of f(X_0))
        perturbation_ratio = |keep| / |target mask of f(X_0)|          (NaN when the model finds no target)

(b) Mullan and Sonka's scores, as Hasany et al. (Sec. 3.4) take them over: *prediction preserved* is the
    Dice between the predictions on the masked and on the original scan, i.e. ``dice_explained`` of
    the same binarisation (reported once, under that name), and

        image_preserved    = |keep| / |grid|   (the fraction of the image kept; the perturbation ratio
                                                divides by the object instead)

(c) Deletion and insertion curves. Voxels ranked by decreasing saliency (ties in a seeded random order,
    so a flat stretch of a map ranks like a random map, not in raster order) are removed from X_0
    (deletion) or inserted into the all-baseline scan (insertion) in K equal steps of the grid's voxel
    count; at each of the K + 1 points x = fraction of voxels removed (inserted):

        probability = mean target probability over the reference's target mask (over the grid if empty)
        dice        = Dice(target mask, the reference's target mask)

    AUC = trapezoid rule over x in [0, 1]. A faithful map: low deletion AUC, high insertion AUC.
    Deletion at x = 1 and insertion at x = 0 are the same all-baseline scan (one pass), and the
    unperturbed ends are the reference: 2K - 1 passes for both curves.

f, the model: a :class:`LoadedModel` runs as the pipeline's inference (softmax of the card's sliding
windows, so the reference equals the explain run's own segmentation), an ``nn.Module`` is called once
on the whole grid (softmax of its logits), and any other callable is taken to return probabilities.
Perturbed scans are made one at a time and sent to f in batches of ``batch_size`` (the whole grid
each time: a perturbation may change the prediction anywhere, so no crop is exact).

:func:`evaluate_maps` scores every map of a ``segxai explain`` output folder and writes
``faithfulness.csv`` beside its ``summary.json``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import SegXAIError
from .fileio import write_csv_rows
from .inference import network_probabilities, select_device, sliding_window_predict, target_mask
from .metrics import dice
from .models.loaders import LoadedModel
from .progress import Progress
from .scaling import minmax

ProbabilityFn = Callable[[torch.Tensor], torch.Tensor]
"""(B, C, *S) scans -> (B, n_classes, *S) softmax probabilities on the CPU."""

TABLE1_THRESHOLDS = (0.0, 0.05, 0.1, 0.2, 0.4)
"""Thresholds on the [0, 1]-scaled map: non-zero (MSR), Seg-Grad-CAM's 0.05 and 0.1, RISE's 0.2 and 0.4."""
TOP_FRACTIONS = (0.01, 0.05)
"""Default top-q fractions of the grid (a 3D object is often 1% of the grid or less)."""


def resolve_baseline(baseline: float | str, image: torch.Tensor) -> float:
    """b in normalised intensity units: a number, or ``"min"`` for the scan's minimum."""
    if baseline == "min":
        return float(image.min())
    try:
        value = float(baseline)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise SegXAIError(f"the baseline must be a number or 'min', got {baseline!r}")
    return value


def probability_fn(model: LoadedModel | nn.Module | ProbabilityFn, device: torch.device | None = None) -> ProbabilityFn:
    """f for a loaded model (its sliding windows, as the pipeline), a network (one pass) or a callable (as is)."""
    device = device or torch.device("cpu")
    if isinstance(model, LoadedModel):
        network = model.network.to(device).eval()

        def windows(images: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return network_probabilities(sliding_window_predict(network, images, model.card.windows, device),
                                             model.card.output)
        return windows
    if isinstance(model, nn.Module):
        def whole(images: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return torch.softmax(model(images.to(device)).float(), dim=1).cpu()
        return whole
    return model


def ranking(saliency: np.ndarray, seed: int = 0) -> np.ndarray:
    """Flat voxel indices by decreasing saliency; ties in a random order drawn from ``seed``."""
    flat = np.asarray(saliency).ravel()
    return np.lexsort((np.random.default_rng(seed).permutation(flat.size), -flat))


def first_voxels(order: np.ndarray, count: int, shape: tuple[int, ...]) -> np.ndarray:
    """Bool (*shape): the first ``count`` voxels of ``order``."""
    keep = np.zeros(order.size, bool)
    keep[order[:count]] = True
    return keep.reshape(shape)


def perturbed(image: torch.Tensor, keep: np.ndarray, baseline: float) -> torch.Tensor:
    """(1, C, *S) scan with the voxels outside ``keep`` (bool (*S)) set to ``baseline``."""
    return torch.where(torch.from_numpy(keep), image, torch.tensor(baseline, dtype=image.dtype))


def _batched(f: ProbabilityFn, images: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """f over (1, C, *S) scans sent ``batch_size`` at a time; yields (n_classes, *S) per scan, in order."""
    batch: list[torch.Tensor] = []
    for image in images:
        batch.append(image)
        if len(batch) == batch_size:
            yield from f(torch.cat(batch))
            batch = []
    if batch:
        yield from f(torch.cat(batch))


def _reference(f: ProbabilityFn, image: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
    return f(image)[0] if reference is None else reference


def region_scores(model: LoadedModel | nn.Module | ProbabilityFn, image: torch.Tensor, keeps: Sequence[np.ndarray],
                  channels: Sequence[int], baseline: float = 0.0, reference: torch.Tensor | None = None,
                  batch_size: int = 1) -> list[dict[str, float]]:
    """``dice_explained``, ``perturbation_ratio`` and ``image_preserved`` of each kept region (module docstring).

    Args:
        image: X_0, (1, C, *S).
        keeps: bool (*S) masks of the voxels kept.
        reference: f(X_0), (n_classes, *S); computed when not given.
    """
    f = probability_fn(model)
    reference_mask = target_mask(_reference(f, image, reference), channels)
    objects = int(reference_mask.sum())
    images = (perturbed(image, keep, baseline) for keep in keeps)
    scores = []
    for keep, probabilities in zip(keeps, _batched(f, images, batch_size)):
        kept = int(keep.sum())
        scores.append({"dice_explained": dice(target_mask(probabilities, channels), reference_mask),
                       "perturbation_ratio": kept / objects if objects else math.nan,
                       "image_preserved": kept / keep.size})
    return scores


def binarised_scores(model: LoadedModel | nn.Module | ProbabilityFn, image: torch.Tensor, saliency: np.ndarray,
                     channels: Sequence[int], baseline: float = 0.0,
                     thresholds: Sequence[float] = TABLE1_THRESHOLDS, top_fractions: Sequence[float] = TOP_FRACTIONS,
                     reference: torch.Tensor | None = None, batch_size: int = 1, seed: int = 0) -> dict[str, float]:
    """Scores (a) and (b) of a (*S) map for each threshold and top fraction.

    Returns:
        ``<score>_gt<t>`` (keep = scaled map > t) and ``<score>_top<100 q>pct`` for score in dice_explained,
        perturbation_ratio, image_preserved.
    """
    if any(not 0 <= t < 1 for t in thresholds) or any(not 0 < q <= 1 for q in top_fractions):
        raise SegXAIError(f"thresholds must lie in [0, 1) and top fractions in (0, 1]; got {list(thresholds)} "
                          f"and {list(top_fractions)}")
    saliency = np.asarray(saliency, dtype=np.float64)
    scaled = minmax(saliency, keep_positive=True)
    keeps = {f"gt{t:g}": scaled > t for t in thresholds}
    order = ranking(saliency, seed)
    keeps.update({f"top{100 * q:g}pct": first_voxels(order, round(q * order.size), saliency.shape)
                  for q in top_fractions})
    scores = region_scores(model, image, list(keeps.values()), channels, baseline, reference, batch_size)
    return {f"{score}_{name}": value for name, row in zip(keeps, scores) for score, value in row.items()}


def auc(x: np.ndarray, y: np.ndarray) -> float:
    """Area under y(x) by the trapezoid rule."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(((y[1:] + y[:-1]) / 2 * np.diff(x)).sum())


@dataclass
class Curve:
    """A deletion or insertion curve: K + 1 points.

    Attributes:
        fractions: x, fraction of the grid's voxels removed (deletion) or inserted (insertion), (K + 1,).
        probability: mean target probability over the reference's target mask, (K + 1,).
        dice: Dice of the target mask with the reference's, (K + 1,).
    """

    fractions: np.ndarray
    probability: np.ndarray
    dice: np.ndarray

    @property
    def auc_probability(self) -> float:
        return auc(self.fractions, self.probability)

    @property
    def auc_dice(self) -> float:
        return auc(self.fractions, self.dice)


def perturbation_curves(model: LoadedModel | nn.Module | ProbabilityFn, image: torch.Tensor, saliency: np.ndarray,
                        channels: Sequence[int], baseline: float = 0.0, steps: int = 10,
                        reference: torch.Tensor | None = None, batch_size: int = 1, seed: int = 0) -> dict[str, Curve]:
    """Deletion and insertion curves (c) of a (*S) map over K = ``steps`` steps: ``{"deletion", "insertion"}``."""
    if steps < 1:
        raise SegXAIError(f"the curves need at least one step, got {steps}")
    f = probability_fn(model)
    reference = _reference(f, image, reference)
    reference_mask = target_mask(reference, channels)
    region = reference_mask if reference_mask.any() else np.ones_like(reference_mask)
    shape = tuple(np.shape(saliency))
    order = ranking(saliency, seed)
    counts = np.round(np.linspace(0.0, 1.0, steps + 1) * order.size).astype(int)

    def scores(probabilities: torch.Tensor) -> tuple[float, float]:
        target = probabilities[list(channels)].sum(0).numpy()
        return float(target[region].mean()), dice(target_mask(probabilities, channels), reference_mask)

    def kept(inserting: bool, k: int) -> np.ndarray:
        top = first_voxels(order, counts[k], shape)
        return top if inserting else ~top

    # deletion k = 1..K (k = K is the all-baseline scan, insertion's start), then insertion k = 1..K-1
    plan = [(False, k) for k in range(1, steps + 1)] + [(True, k) for k in range(1, steps)]
    images = (perturbed(image, kept(inserting, k), baseline) for inserting, k in plan)
    measured = dict(zip(plan, (scores(p) for p in _batched(f, images, batch_size))))
    unperturbed = scores(reference)
    deletion = [unperturbed] + [measured[(False, k)] for k in range(1, steps + 1)]
    insertion = [measured[(False, steps)]] + [measured[(True, k)] for k in range(1, steps)] + [unperturbed]
    x = counts / order.size
    return {name: Curve(x, np.array([p for p, _ in points]), np.array([d for _, d in points]))
            for name, points in (("deletion", deletion), ("insertion", insertion))}


# ------------------------------------------------------------------ an explain output folder
def _read_summary(folder: Path) -> dict[str, Any]:
    path = folder / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SegXAIError(f"{path} not found; give the output folder of 'segxai explain'") from None
    except json.JSONDecodeError as exc:
        raise SegXAIError(f"{path} is not valid JSON ({exc}); run 'segxai explain' again") from None
    if not summary.get("maps") or "target" not in summary:
        raise SegXAIError(f"{path} lists no maps to evaluate; run 'segxai explain' with methods that write maps")
    return summary


def evaluate_maps(folder: str | Path, model: LoadedModel | str | None = None, steps: int = 10,
                  device: str | torch.device = "auto", baseline: float | str = 0.0,
                  thresholds: Sequence[float] = TABLE1_THRESHOLDS, top_fractions: Sequence[float] = TOP_FRACTIONS,
                  progress: Progress | None = None, batch_size: int = 1) -> list[dict[str, Any]]:
    """Score every map listed in ``folder/summary.json``; write ``folder/faithfulness.csv``; return its rows.

    The scan named in the summary is preprocessed again to the model grid (which must match the run's),
    each map file is resampled from the scan's grid onto it (linear, as the pipeline resamples the other
    way) and min-max scaled, and the reference is the model's prediction on the unperturbed scan.

    Args:
        model: the loaded model, a model name/card path, or ``None`` for the model named in the summary
            (it must be the model that was explained).
        steps: K of the deletion and insertion curves.
        baseline: b, a number or ``"min"``.

    Returns:
        one dict per map: ``map``, ``method``, ``variant``, ``class``, the scores of
        :func:`binarised_scores`, ``deletion_auc_probability``, ``deletion_auc_dice``,
        ``insertion_auc_probability``, ``insertion_auc_dice`` and ``seconds``.
    """
    from .models.registry import load_model
    from .preprocessing import preprocess, resample_to_grid
    from .report.html import summary_scan_path
    from .volume import read_volume

    folder = Path(folder)
    progress = progress or Progress()
    summary = _read_summary(folder)
    loaded = model if isinstance(model, LoadedModel) else load_model(model or summary["model"]["name"])
    if loaded.card.name != summary["model"]["name"]:
        raise SegXAIError(f"the maps in {folder} explain model {summary['model']['name']!r}, not "
                          f"{loaded.card.name!r}; give that model (or leave --model out)")
    grid = preprocess(read_volume(summary_scan_path(summary["input"], folder)), loaded.card.preprocessing)
    if list(grid.shape[::-1]) != list(summary["model_grid"]["shape_ijk"]):
        raise SegXAIError(f"the scan {summary['input']} now gives a model grid of {list(grid.shape[::-1])} voxels, "
                          f"not the explain run's {summary['model_grid']['shape_ijk']}; explain the scan again")
    _, channels = loaded.card.target_channels(summary["target"]["name"])
    image = torch.from_numpy(np.ascontiguousarray(grid.array, dtype=np.float32))[None, None]
    baseline = resolve_baseline(baseline, image)
    device = device if isinstance(device, torch.device) else select_device(device)
    f = probability_fn(loaded, device)

    maps = summary["maps"]
    passes_per_map = len(thresholds) + len(top_fractions) + 2 * steps - 1
    total = 1 + len(maps) * passes_per_map
    done = 0
    current = "reference"

    def counted(images: torch.Tensor) -> torch.Tensor:
        nonlocal done
        probabilities = f(images)
        done += images.shape[0]
        progress.update("evaluate-maps", done / total, f"{current} ({done}/{total} passes)")
        return probabilities

    rows = []
    try:
        reference = counted(image)[0]
        for item in maps:
            start = time.perf_counter()
            current = item["file"]
            saliency = minmax(resample_to_grid(read_volume(folder / item["file"]), grid).array.astype(np.float64),
                              keep_positive=True)
            row: dict[str, Any] = {"map": item["file"], "method": item["method"], "variant": item.get("variant") or "",
                                   "class": item.get("class", summary["target"]["name"])}
            row.update(binarised_scores(counted, image, saliency, channels, baseline, thresholds, top_fractions,
                                        reference, batch_size))
            curves = perturbation_curves(counted, image, saliency, channels, baseline, steps, reference, batch_size)
            for name, curve in curves.items():
                row[f"{name}_auc_probability"] = curve.auc_probability
                row[f"{name}_auc_dice"] = curve.auc_dice
            row["seconds"] = round(time.perf_counter() - start, 3)
            rows.append(row)
    finally:
        loaded.network.to("cpu")
    write_csv_rows(folder / "faithfulness.csv", rows)
    return rows
