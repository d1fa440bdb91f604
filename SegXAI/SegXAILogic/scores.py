"""Case-level scores of a run in plain language, and when to advise reviewing the case.

The scores come from summary.json (``scores``: ``<method>.mean_sa``, ``<method>.<measure>_inside``,
``object_volume_ml``; a reliability probability when a method reports one). METHODS.md section 7:
low mean SA, high uncertainty inside the object or low reliability mean "review this case".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["CaseScore", "caseScores", "reviewAdvice", "MEAN_SA_REVIEW_BELOW", "UNCERTAINTY_REVIEW_ABOVE",
           "RELIABILITY_REVIEW_BELOW"]

MEAN_SA_REVIEW_BELOW = 0.5
"""Mean SA score mu (Dice of the prototype segmentation with the model's own mask): below one half, the
last layers' features separate the object no better than chance (He et al.: low mu, low Dice)."""
UNCERTAINTY_REVIEW_ABOVE = 0.5
"""Mean predictive entropy inside the object as a fraction of its maximum, log(number of classes)."""
RELIABILITY_REVIEW_BELOW = 0.5
"""Probability that the segmentation reaches Dice 0.9 (MiSuRe's reliability classifier)."""


@dataclass(frozen=True)
class CaseScore:
    """One score as the panel shows it; ``poor`` marks a reason to review the case."""

    key: str
    label: str
    value: float
    text: str
    poor: bool


def caseScores(summary: dict) -> list[CaseScore]:
    """The case-level scores of a summary, each with a sentence and a poor/fine verdict."""
    scores = summary.get("scores", {})
    n_classes = max(2, len(summary.get("classes", [])))
    target = summary.get("target", {}).get("name", "the object")
    result = []
    volume = scores.get("object_volume_ml")
    if volume is not None:
        result.append(CaseScore("object_volume_ml", f"Volume of {target}", float(volume), f"{float(volume):.2f} mL",
                                float(volume) <= 0.0))
    for key, value in scores.items():
        method, _, name = key.partition(".")
        if not isinstance(value, (int, float)) or not name:
            continue
        value = float(value)
        if name == "mean_sa":
            result.append(CaseScore(key, f"Mean segmentation ability ({method})", value, f"{value:.2f} (1 = best)",
                                    value < MEAN_SA_REVIEW_BELOW))
        elif name == "entropy_inside":
            share = value / math.log(n_classes)
            result.append(CaseScore(key, f"Uncertainty inside {target} ({method} entropy)", share,
                                    f"{100 * share:.0f}% of the maximum", share > UNCERTAINTY_REVIEW_ABOVE))
        elif "reliability" in name:
            result.append(CaseScore(key, f"Reliability ({method})", value, f"{100 * value:.0f}% chance of Dice >= 0.9",
                                    value < RELIABILITY_REVIEW_BELOW))
    return result


def reviewAdvice(scores: list[CaseScore]) -> str | None:
    """``Review this case: ...`` naming every poor score, or ``None`` when none is poor."""
    reasons = []
    for score in scores:
        if not score.poor:
            continue
        if score.key == "object_volume_ml":
            reasons.append("the model found no object")
        elif score.key.endswith("mean_sa"):
            reasons.append(f"the network's features barely separate the object (mean SA {score.value:.2f})")
        elif score.key.endswith("entropy_inside"):
            reasons.append(f"the model is uncertain inside the object ({score.text})")
        else:
            reasons.append(f"low reliability ({score.text})")
    return "Review this case: " + "; ".join(reasons) + "." if reasons else None
