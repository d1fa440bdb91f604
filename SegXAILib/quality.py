"""When a case needs review: one rule per case-level score, calibratable per model card.

This is the single source of the "review this case" verdict (METHODS.md section 7). The explain
pipeline writes :func:`review_case` into ``summary.json`` as ``summary["review"]``; the HTML report
and the Slicer panel show that entry, and compute it here only for summaries written before it existed.
The module imports neither torch nor MONAI, so both can import it cheaply.

A case needs review when any case-level score crosses its threshold. The defaults below are simple,
fixed numbers (not fitted on a cohort). A model card may replace them with thresholds calibrated on
its own validation cases, because a score's typical value depends on the model: the bundled models'
mean SA score is about 0.08 to 0.3 on good segmentations, far below the default 0.5. The card's
optional ``review`` object names the score and the side that asks for review, plus where the numbers
come from::

    "review": {"mean_sa_below": 0.05,
               "basis": "5th percentile of mean SA on 24 validation cases (Dice >= 0.7)"}

Keys are ``<score>_below`` or ``<score>_above`` for the scores of :data:`SCORE_RULES`, in the units of
the default (entropy and mutual information as a fraction of log(number of classes)). Either way a
threshold says "look at this case more closely", never "this segmentation is right".

No score past its threshold is no all-clear when checks were left out: the verdict lists the checks of
:data:`CHECKS` (size, segmentation ability, uncertainty inside the object, reliability) that the run made
and, for each one it did not, what would make it (a method to add, a reliability model to fit).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .errors import SegXAIError
from .glossary import counted, method_name, readable
from .image_quality import IMAGE_SCORES

__all__ = ["CHECKS", "Check", "ScoreRule", "ScoreRow", "SCORE_RULES", "DEFAULT_BASIS", "case_checks",
           "is_finite_number", "reliability_judges", "review_case", "review_limits", "score_rows",
           "verdict_sentence"]

SA_REVIEW_BELOW = 0.5
"""Mean SA score mu below this: the last layers' features barely separate the object from the rest
(paper 003, Sec. 4.6: low mu goes with low Dice; 0.5 is the midpoint of the score's [0, 1] range).
Models differ a lot here: calibrate it in the model card."""

ENTROPY_REVIEW_ABOVE = 0.5
"""Mean predictive entropy inside the object above this fraction of its maximum, log(number of
classes): for three classes a voxel predicted 90% / 5% / 5% has 0.36 of the maximum, 80% / 10% / 10%
has 0.58."""

MUTUAL_INFORMATION_REVIEW_ABOVE = 0.2
"""Mean mutual information inside the object above this fraction of log(number of classes): the
repeated predictions themselves disagree, not just each one being unsure."""

VARIANCE_REVIEW_ABOVE = 0.05
"""Mean variance of the target probability inside the object above this (the maximum is 0.25): a
typical spread of about +-0.22 in the probability between repeated predictions."""

OBJECT_REVIEW_BELOW_ML = 0.1
"""Segmented object smaller than this (0.1 mL = 100 cubic mm): nothing, or a few stray voxels, was found."""

RELIABILITY_REVIEW_BELOW = 0.5
"""Reliability probability (MiSuRe's post-hoc classifier: the chance that the segmentation is right)
below one half: the classifier thinks a wrong segmentation more likely than a right one."""

RELIABILITY_MIN_AUC_CV = 0.75
"""A reliability classifier judges cases (its review rule, the audit's order) only when its
cross-validated AUROC reaches this. Fitted on few or similar cases it falls short, and would flag
and reorder cases by noise; its probability is then still shown, with that AUROC, but not judged."""

DEFAULT_BASIS = "fixed default"
"""The basis reported for a threshold that no model card calibrated."""


@dataclass(frozen=True)
class ScoreRule:
    """How one case-level score is named, explained and flagged.

    Attributes:
        label: short name shown in the table.
        meaning: plain-language explanation; may use ``{target}``, ``{method}`` and ``{max_entropy}``.
        concern: what a flagged value says, as a clause for the review reasons; may use ``{target}``.
        review: ``"below"`` or ``"above"``: which side of ``limit`` asks for review.
        limit: the default review threshold.
        of_max_entropy: ``limit`` is a fraction of log(number of classes), the largest entropy possible.
    """

    label: str
    meaning: str
    concern: str
    review: str
    limit: float
    of_max_entropy: bool = False

    def threshold(self, limit: float, n_classes: int) -> float:
        """``limit`` (the default :attr:`limit` or a model card's) in the score's own units."""
        return limit * math.log(n_classes) if self.of_max_entropy else limit

    def crossed(self, value: float, threshold: float) -> bool:
        """Whether ``value`` is strictly past ``threshold`` on the side that asks for review."""
        return value < threshold if self.review == "below" else value > threshold


SCORE_RULES: dict[str, ScoreRule] = {
    "object_volume_ml": ScoreRule(
        "Volume of the segmented object (mL)",
        "How much the model segmented as {target}, in millilitres (1 mL = 1 cubic centimetre).",
        "the model segmented almost nothing as {target}", "below", OBJECT_REVIEW_BELOW_ML),
    "mean_sa": ScoreRule(
        "Segmentation ability of the last layers (mean SA \u03bc)",
        "How cleanly the features of the network's last two layers separate the segmented {target} from "
        "everything else, from 0 (not at all) to 1 (perfectly). It needs no ground truth; low values go with "
        "poor segmentations, typically of small or blurred objects.",
        "the network's last layers barely separate the {target} from the rest", "below", SA_REVIEW_BELOW),
    "entropy_inside": ScoreRule(
        "Uncertainty inside the object (entropy, nats)",
        "Mean uncertainty of repeated predictions inside the segmented {target}, in nats (information counted "
        "with the natural logarithm): 0 = all certain and in agreement, {max_entropy:.2f} (ln of the "
        "{n_classes} classes) = no idea which class.",
        "repeated predictions are unsure inside the {target}", "above", ENTROPY_REVIEW_ABOVE, True),
    "variance_inside": ScoreRule(
        "Disagreement inside the object (variance)",
        "Mean variance of the {target} probability between repeated predictions, inside the segmented "
        "{target}: 0 = they agree, 0.25 = half say certainly yes and half certainly no.",
        "repeated predictions disagree about the {target}", "above", VARIANCE_REVIEW_ABOVE),
    "mutual_information_inside": ScoreRule(
        "Model uncertainty inside the object (mutual information, nats)",
        "The part of the uncertainty inside the segmented {target} that comes from the repeated predictions "
        "disagreeing with each other (the model is unsure, not the image): 0 = they agree, at most "
        "{max_entropy:.2f} nats.",
        "the model itself is unsure inside the {target}", "above", MUTUAL_INFORMATION_REVIEW_ABOVE, True),
    "reliability": ScoreRule(
        "Reliability (probability)",
        "The chance, from 0 to 1, that this segmentation of the {target} is right, predicted by a reliability "
        "classifier from the case's explanations (no ground truth needed).",
        "the segmentation of the {target} is more likely wrong than right", "below", RELIABILITY_REVIEW_BELOW),
}
"""The rules by score name (the part after ``<method>.``); any name containing ``reliability`` uses
the ``reliability`` rule."""


def rule_name(name: str) -> str | None:
    """The key of :data:`SCORE_RULES` that judges a score called ``name``, or ``None``."""
    if name in SCORE_RULES:
        return name
    return "reliability" if "reliability" in name else None


def review_limits(card_review: dict[str, Any] | None) -> dict[str, tuple[float, str]]:
    """The limit and its basis for every rule: the card's calibrated ones, else the defaults.

    Raises:
        SegXAIError: a key of ``card_review`` names no rule or the wrong side, a limit is not a
            finite number, or limits come without a ``basis`` string (a threshold nobody can trace
            cannot be judged by the reader of the report).
    """
    limits = {name: (rule.limit, DEFAULT_BASIS) for name, rule in SCORE_RULES.items()}
    card_review = dict(card_review or {})
    basis = card_review.pop("basis", None)
    known = [f"{name}_{rule.review}" for name, rule in SCORE_RULES.items()]
    for key, limit in card_review.items():
        if key not in known:
            raise SegXAIError(f"review key {key!r} names no review threshold; use 'basis' and any of "
                              f"{', '.join(known)}")
        if not is_finite_number(limit):
            raise SegXAIError(f"review threshold {key!r} must be a number, got {limit!r}")
        if not isinstance(basis, str) or not basis.strip():
            raise SegXAIError("review thresholds need a 'basis' saying where they come from, "
                              "e.g. '5th percentile of mean SA on 24 validation cases (Dice >= 0.7)'")
        limits[key.rpartition("_")[0]] = (float(limit), basis)
    return limits


def is_finite_number(value: Any) -> bool:
    """A finite int or float (JSON's numbers), not a bool: a score or threshold that can be compared."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class ScoreRow:
    """One case-level score, explained and judged (an entry of ``summary["review"]["scores"]``)."""

    key: str
    label: str
    value: Any
    meaning: str
    rule: str
    review: bool


def score_rows(summary: dict[str, Any], card_review: dict[str, Any] | None = None) -> list[ScoreRow]:
    """The case-level scores of ``summary["scores"]`` ("<method>.<name>" or "<name>"), explained and flagged.

    A score without a rule is explained but never flagged; so is a rule's score that is not a finite number.
    """
    target = _target(summary)
    n_classes = _n_classes(summary)
    thresholds = _thresholds(card_review, n_classes)
    rows = []
    for key, value in (summary.get("scores") or {}).items():
        method, _, name = key.rpartition(".")
        by = f" ({method_name(method)})" if method and method != "image" else ""
        ruled = rule_name(name)
        if ruled is None:
            image_score = method == "image" and name in IMAGE_SCORES
            label = f"Scan {IMAGE_SCORES[name]}" if image_score else name.replace("_", " ") + by
            rows.append(ScoreRow(key, label, value, _unknown_score_meaning(summary, method, name),
                                 "", False))
            continue
        rule, used = SCORE_RULES[ruled], thresholds[ruled]
        sign = "<" if rule.review == "below" else ">"
        text = f"review if {sign} {used['threshold']:.3g}"
        if used["basis"] != DEFAULT_BASIS:
            text += f", calibrated: {used['basis']}"
        judged = _rule_judges(ruled, summary)
        if not judged:
            auc = _classifier_auc(summary)
            text = (f"not used for review: the classifier's cross-validated AUROC is "
                    f"{f'{auc:.2f}' if is_finite_number(auc) else 'unknown'}, below {RELIABILITY_MIN_AUC_CV}")
        meaning = rule.meaning.format(target=target, n_classes=n_classes, max_entropy=math.log(n_classes))
        rows.append(ScoreRow(key, rule.label + by, value, meaning, text,
                             judged and is_finite_number(value) and rule.crossed(float(value), used["threshold"])))
    return rows


def _rule_judges(rule: str | None, summary: dict[str, Any]) -> bool:
    """Whether scores under ``rule`` may flag the case of ``summary`` (all but an untrusted reliability)."""
    return rule != "reliability" or reliability_judges(summary)


def reliability_judges(summary: dict[str, Any]) -> bool:
    """Whether the reliability score of ``summary`` may flag and order cases: unless the record of its
    classifier (``summary["reliability_model"]``) gives a cross-validated AUROC below
    :data:`RELIABILITY_MIN_AUC_CV`, or none (too few cases to cross-validate)."""
    if summary.get("reliability_model") is None:
        return True
    auc = _classifier_auc(summary)
    return is_finite_number(auc) and auc >= RELIABILITY_MIN_AUC_CV


def _classifier_auc(summary: dict[str, Any]) -> Any:
    """The cross-validated AUROC recorded for the reliability classifier of ``summary`` (None if none)."""
    return (summary.get("reliability_model") or {}).get("auc_cv")


def review_case(summary: dict[str, Any], card_review: dict[str, Any] | None = None) -> dict[str, Any]:
    """Whether the case of ``summary`` needs review, why, and by which thresholds.

    Args:
        summary: ``summary.json`` of an explain run (its ``scores``, ``classes``, ``target``, ``maps``).
        card_review: the model card's ``review`` object (calibrated thresholds and their basis), if any.

    Returns:
        ``{"needed": bool, "reasons": [one clause per flagged score], "complete": bool (every check of
        :data:`CHECKS` made), "checks": :func:`case_checks`, "verdict": the verdict in words, "scores":
        [:class:`ScoreRow` as dicts], "thresholds": {rule: {"review", "threshold", "basis"[,
        "fraction_of_max_entropy"]}}}``; ``thresholds`` holds the rules that judged a score of this summary,
        ``threshold`` in the score's own units.
    """
    rows = score_rows(summary, card_review)
    thresholds = _thresholds(card_review, _n_classes(summary))
    used = [_row_rule(row) for row in rows]
    target = _target(summary)
    reasons = [f"{SCORE_RULES[name].concern.format(target=target)} ({row.label} = {readable(row.value)}; {row.rule})"
               for row, name in zip(rows, used) if row.review]
    checks = case_checks(summary, rows)
    return {"needed": bool(reasons), "reasons": reasons, "complete": all(c["made"] for c in checks),
            "checks": checks, "verdict": verdict_sentence(reasons, checks, target),
            "scores": [asdict(row) for row in rows],
            "thresholds": {name: thresholds[name] for name in SCORE_RULES if name in used}}


# ------------------------------------------------------------------ the checks a verdict rests on
@dataclass(frozen=True)
class Check:
    """One question the verdict asks of a case: the review rules that answer it and what a run needs for them.

    Attributes:
        name: the question in a reader's words.
        rules: keys of :data:`SCORE_RULES`; the check is made when a score under any of them is judged.
        how: what to run to make it, for a run that did not.
    """

    name: str
    rules: tuple[str, ...]
    how: str


CHECKS: tuple[Check, ...] = (
    Check("size of the segmented object", ("object_volume_ml",), "every explain run measures it"),
    Check("segmentation ability", ("mean_sa",), "add protoseg to --methods"),
    Check("uncertainty inside the object", ("entropy_inside", "variance_inside", "mutual_information_inside"),
          "add mcdropout, tta or ensemble to --methods"),
    Check("reliability", ("reliability",),
          "needs a reliability model for this model (fit one with 'segxai train-reliability' on labelled "
          "cases) and the methods it was fitted with"),
)
"""The checks of the review verdict, in the order they are listed. A verdict without a problem is only as
strong as the checks that were made; the ones left out are named with what would make them."""


def case_checks(summary: dict[str, Any], rows: list[ScoreRow]) -> list[dict[str, Any]]:
    """Each of :data:`CHECKS` for ``summary``: ``{"check", "made", "scores"}``, and ``"how"`` (what to run to
    make it) for a check not made.

    A check is made when a score under one of its rules is a finite number that may flag the case. For
    reliability, the reason the run recorded (``summary["not_applicable"]["reliability"]``: the methods the
    reliability model needs) or the classifier's too-low AUROC replaces the general advice.
    """
    checks = []
    for check in CHECKS:
        ruled = [row for row in rows if _row_rule(row) in check.rules]
        judged = [row.key for row in ruled if is_finite_number(row.value) and _rule_judges(_row_rule(row), summary)]
        entry: dict[str, Any] = {"check": check.name, "made": bool(judged), "scores": judged}
        if not judged:
            entry["how"] = _how_to_make(check, ruled, summary)
        checks.append(entry)
    return checks


def _row_rule(row: ScoreRow) -> str | None:
    """The key of :data:`SCORE_RULES` that judges ``row`` (``None``: no rule)."""
    return rule_name(row.key.rpartition(".")[2])


def _how_to_make(check: Check, ruled: list[ScoreRow], summary: dict[str, Any]) -> str:
    """Why ``check`` was not made and what would make it."""
    if check.rules == ("reliability",):
        recorded = (summary.get("not_applicable") or {}).get("reliability")
        if recorded:
            return str(recorded)
        if ruled and not reliability_judges(summary):
            return ruled[0].rule
    if ruled:
        return "its score was not a number (nothing segmented?)"
    return check.how


def verdict_sentence(reasons: list[str], checks: list[dict[str, Any]], target: str) -> str:
    """The verdict in one paragraph: the review reasons, or how many checks found nothing; then the checks not
    made and what would make them."""
    made = [c["check"] for c in checks if c["made"]]
    missing = [c for c in checks if not c["made"]]
    if reasons:
        text = "Review this case: " + "; ".join(reasons) + "."
    elif not missing:
        text = (f"No problem found by the {len(made)} checks ({', '.join(made)}). This does not prove the "
                f"outline of the {target} is right; look at the pictures.")
    else:
        text = (f"No problem found by the {counted(len(made), 'check')} that ran ({', '.join(made) or 'none'}); "
                f"{counted(len(missing), 'check')} not run, so this is no all-clear.")
    if missing:
        text += " Not checked: " + "; ".join(f"{c['check']} ({c['how']})" for c in missing) + "."
    return text


def _thresholds(card_review: dict[str, Any] | None, n_classes: int) -> dict[str, dict[str, Any]]:
    """Every rule's threshold in its score's units, its side and its basis (fraction of log(n) where it is one)."""
    thresholds = {}
    for name, (limit, basis) in review_limits(card_review).items():
        rule = SCORE_RULES[name]
        thresholds[name] = {"review": rule.review, "threshold": rule.threshold(limit, n_classes), "basis": basis}
        if rule.of_max_entropy:
            thresholds[name]["fraction_of_max_entropy"] = limit
    return thresholds


def _target(summary: dict[str, Any]) -> str:
    return (summary.get("target") or {}).get("name", "object")


def _n_classes(summary: dict[str, Any]) -> int:
    return max(2, len(summary.get("classes", [])))


def _unknown_score_meaning(summary: dict[str, Any], method: str, name: str) -> str:
    """A score without a rule: a ``*_inside`` mean explained by its map's own description, an image score
    by :data:`SegXAILib.image_quality.IMAGE_SCORES`."""
    if method == "image" and name in IMAGE_SCORES:
        return (f"The scan's {IMAGE_SCORES[name]}, measured on the scan itself (no model involved). An audit "
                "flags a case whose value is far from the rest of its cohort's.")
    if name.endswith("_inside"):
        variant = name[: -len("_inside")]
        for item in summary.get("maps", []):
            if item.get("method") == method and item.get("variant") == variant:
                return f"Mean inside the segmented object of: {item.get('description', variant)}."
    return f"Reported by {method_name(method) if method else 'the pipeline'}."
