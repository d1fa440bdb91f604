"""Judge one explained case: its scores, reliability, review verdict and uncertainty agreement.

Judging returns data and writes nothing, so a verdict can be had without files (a notebook, the
audit, the Slicer logic) and the files (:mod:`SegXAILib.outputs`) only record it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .explain.pipeline import ExplainResult
from .image_quality import image_quality
from .metrics import dice_per_target
from .models.card import ModelCard
from .preprocessing import foreground_mask
from .quality import review_case
from .reliability import case_features, judge_reliability
from .uncertainty.collaboration import agreement
from .volume import Volume

SAMPLED_UNCERTAINTY = ("ensemble", "mcdropout", "tta")
"""Methods whose entropy and variance maps the collaboration-gradient map is compared with."""


@dataclass
class CaseVerdict:
    """What the explanation of one case says about trusting its segmentation.

    Attributes:
        scores: case-level scores (``<method>.<score>``, ``object_volume_ml``, ``image.<score>``, and
            ``reliability`` when a reliability model judged the case).
        review: :func:`SegXAILib.quality.review_case`: ``needed``, ``reasons``, ``scores``, ``thresholds``.
        agreement: the collaboration-gradient map against the sampled uncertainties (``{}`` unless both ran).
        reliability_model: the record of the reliability model that judged the case, or ``None``.
        not_applicable: judgements that could not be made, with the reason (``reliability``).
        dice: Dice of every class and group against the ground truth, when one was given (``{}`` otherwise).
    """

    scores: dict[str, Any]
    review: dict[str, Any]
    agreement: dict[str, Any] = field(default_factory=dict)
    reliability_model: dict[str, Any] | None = None
    not_applicable: dict[str, str] = field(default_factory=dict)
    dice: dict[str, float] = field(default_factory=dict)


def case_scores(run: ExplainResult) -> dict[str, Any]:
    """Case-level quality scores: mean SA mu, mean uncertainty inside the object, object volume, and the
    scan's acquisition quality (:func:`SegXAILib.image_quality.image_quality`, as ``image.<name>``).

    Explainers report scalars; those named ``mean_sa`` or ``*_inside`` (a mean inside the predicted
    object) are case-level scores and are collected here as ``<method>.<name>``.
    """
    labels = run.segmentation.labels
    voxels = int(run.target_on_scan().sum())
    scores: dict[str, Any] = {"object_volume_ml": round(voxels * float(np.prod(labels.spacing)) / 1000, 4)}
    scan = run.segmentation.scan
    scores |= {f"image.{name}": value if np.isfinite(value) else None  # None: JSON null, not NaN
               for name, value in image_quality(scan.array, scan.spacing).items()}
    for explanation in run.explanations:
        for key, value in explanation.scalars.items():
            if key == "mean_sa" or key.endswith("_inside"):
                scores[f"{explanation.method}.{key}"] = value
    return scores


def comparison_region(run: ExplainResult, card_modality: str) -> tuple[np.ndarray, str]:
    """Where uncertainty maps are compared: the brain of a brain MRI, else the scan's foreground.

    Paper 000 compares inside the brain (the case's one brain estimate, on the model grid); elsewhere the
    body (Otsu foreground) plays that part.
    """
    grid = run.segmentation.model_grid
    if card_modality.upper().startswith("MRI"):
        mask = run.segmentation.brain.on(grid)
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
    region, region_name = comparison_region(run, card_modality)
    return {"map": "mhex-uncertainty", "region": region_name, "region_voxels": int(region.sum()),
            "against": {name: agreement(collaboration, other, region) for name, other in others.items()}}


def judge_case(run: ExplainResult, card: ModelCard, label: Volume | None = None) -> CaseVerdict:
    """Scores, reliability (when a reliability model lies beside ``card``), review verdict by the card's
    thresholds, uncertainty agreement of ``run``, and with a ground-truth ``label`` (on the scan's grid) the
    Dice of every class and group (:func:`~SegXAILib.metrics.dice_per_target`); nothing is written.

    The label never enters the scores or the verdict: they stay what a case without one would get."""
    scores = case_scores(run)
    # the fields of summary.json that the reliability features and the review rules read
    record: dict[str, Any] = {
        "target": {"name": run.target, "labels": run.label_values},
        "classes": [{"name": c.name, "label": c.label} for c in card.classes],
        "maps": [{"method": e.method, "variant": m.variant, "description": m.description}
                 for e in run.explanations for m in e.maps],
        "explanations": [{"method": e.method, "scalars": e.scalars} for e in run.explanations],
        "scores": scores,
    }
    not_applicable: dict[str, str] = {}
    reliability = judge_reliability(card, run.target, case_features(record))
    if reliability is not None and reliability.probability is None:
        not_applicable["reliability"] = reliability.reason
    elif reliability is not None:
        scores["reliability"] = reliability.probability
        record["reliability_model"] = reliability.record
    record["not_applicable"] = not_applicable  # the verdict names why reliability was not judged
    dice = {} if label is None or card.multilabel else dice_per_target(run.segmentation.labels.array, label.array, card)
    return CaseVerdict(scores, review_case(record, card.review), uncertainty_agreement(run, card.modality),
                       record.get("reliability_model"), not_applicable, dice)
