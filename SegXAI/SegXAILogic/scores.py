"""Case-level scores of a run as the panel shows them, and the "review this case" advice.

Both come from ``summary["review"]``, which the explain run writes with the model card's thresholds
(:func:`SegXAILib.quality.review_case`, the one place the review rules live; METHODS.md section 7).
A summary written before that entry existed is judged with the default thresholds, as the HTML report
does. SegXAILib ships beside this module, and :mod:`SegXAILib.quality` imports neither torch nor MONAI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from SegXAILib.quality import review_case

__all__ = ["CaseScore", "SequenceShare", "caseReview", "caseScores", "reviewAdvice", "reviewVerdict",
           "sequenceShares"]


@dataclass(frozen=True)
class CaseScore:
    """One score as the panel shows it; ``poor`` marks a reason to review the case."""

    key: str
    label: str
    value: Any
    text: str
    poor: bool


@dataclass(frozen=True)
class SequenceShare:
    """How much the target's segmentation relied on one input sequence (the ``sequences`` method)."""

    name: str
    share: float
    """its share of the integrated gradients' |attribution| (all sequences together: 1)"""
    dice_when_hidden: float
    """Dice of the target's outline with this sequence hidden against the outline with every sequence (1: unchanged)"""


def sequenceShares(summary: dict) -> list[SequenceShare]:
    """Each input sequence's part in the target's segmentation, in the model's order; empty when the run did not
    compute it (a model of one scan, or the method not chosen)."""
    explanation = next((e for e in summary.get("explanations") or [] if e.get("method") == "sequences"), None)
    if explanation is None:
        return []
    scalars = explanation.get("scalars") or {}
    return [SequenceShare(name, float(scalars.get(f"ig_share.{name}", math.nan)),
                          float(scalars.get(f"occlusion_dice.{name}", math.nan)))
            for name in (explanation.get("metadata") or {}).get("sequences") or []]


def caseReview(summary: dict) -> dict:
    """The summary's review verdict, computed with the default thresholds for an older summary."""
    return summary.get("review") or review_case(summary)


def caseScores(summary: dict) -> list[CaseScore]:
    """The case-level scores of a summary, each with its value, review threshold and verdict."""
    return [CaseScore(s["key"], s["label"], s["value"], _text(s["value"], s["rule"]), s["review"])
            for s in caseReview(summary)["scores"]]


def reviewAdvice(summary: dict) -> str | None:
    """``Review this case: ...`` with the reason of every flagged score, or ``None`` when none is flagged."""
    reasons = caseReview(summary)["reasons"]
    return "Review this case: " + "; ".join(reasons) + "." if reasons else None


def reviewVerdict(summary: dict) -> tuple[str, str]:
    """The verdict as the panel shows it: ``(sentence, level)``, level ``"review"`` (a score asks for review),
    ``"incomplete"`` (no score did, but checks were not run: the sentence names them and what to add) or
    ``"ok"`` (every check made, none flagged). A summary written before the checks existed has no sentence:
    it gets the advice alone and counts as incomplete."""
    review = caseReview(summary)
    if review["needed"]:
        return review.get("verdict") or reviewAdvice(summary), "review"
    if "verdict" not in review:
        return "No score of this run asks for review; which checks ran is not recorded.", "incomplete"
    return review["verdict"], "ok" if review["complete"] else "incomplete"


def _text(value: Any, rule: str) -> str:
    """``0.412 (review if < 0.5)``: the value, and the threshold when the score has one."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    shown = f"{value:.3g}" if number else str(value)
    return f"{shown} ({rule})" if rule else shown
