"""Post-hoc reliability: the probability that a segmentation is right, from its explanation (METHODS.md 4, 7).

MiSuRe (paper 002, Table 7) predicts from a case's explanation, with no ground truth, whether the
segmentation reached Dice >= 0.9: a logistic regression on case-level features. We use the features
of one ``summary.json`` (:func:`case_features`):

==============================  ======================================================================
feature                         from
==============================  ======================================================================
``misure.dilations``            ``summary["explanations"]``, method ``misure``: stage-1 dilations
``misure.dice_explained``       the same: Dice of the prediction from the minimally sufficient region
``misure.perturbation_ratio``   the same: MSR voxels / object voxels
``protoseg.mean_sa``            ``summary["scores"]``: mean SA score mu (always label-free)
``<method>.entropy_inside``     ``summary["scores"]``: mean predictive entropy inside the object
``log_object_volume_ml``        log(1 + ``scores["object_volume_ml"]``): volumes span orders of magnitude
==============================  ======================================================================

Missing features. A model is trained on the features that *every* training case has (the methods the
training run used); applying it needs exactly those features, and :meth:`ReliabilityModel.matrix`
raises a :class:`SegXAIError` naming the method to add otherwise. ``segxai explain`` does not fail
for that: it records why in ``summary["not_applicable"]["reliability"]`` and reports no reliability.

Storage. :func:`fit_reliability` uses scikit-learn (standardisation + ``LogisticRegression``, no class
weights, so the output stays a probability under the training cases' prevalence of good
segmentations). The fitted numbers are saved as JSON, never as a pickle (a pickle can run code when
loaded): ``<card name>.reliability.json`` beside the model card (:func:`reliability_path`). Applying
is ``sigmoid(((x - mean) / scale) . coef + intercept)`` in NumPy and needs no scikit-learn.

When that file exists, judging a case (:mod:`SegXAILib.verdict`) adds ``scores["reliability"]``
(:func:`judge_reliability`),
which :mod:`SegXAILib.quality` judges with its ``reliability`` rule (review below 0.5), so the report
and the Slicer panel show it with the other case-level scores.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SegXAIError
from .fileio import atomic_write_text, read_json_object
from .glossary import method_name
from .models.card import ModelCard
from .quality import is_finite_number

__all__ = ["GOOD_DICE", "ReliabilityJudgement", "ReliabilityModel", "case_features", "fit_reliability",
           "judge_reliability", "reliability_path"]

GOOD_DICE = 0.9
"""A segmentation counts as right when its Dice with the ground truth reaches this (paper 002)."""

MISURE_FEATURES = ("dilations", "dice_explained", "perturbation_ratio")
"""MiSuRe's scalars that the paper's reliability classifier uses."""

VOLUME_FEATURE = "log_object_volume_ml"

FORMAT = "segxai-reliability"

FAR_FROM_TRAINING_SD = 5.0
"""A case whose feature lies more than this many training standard deviations from the training mean gets
no probability: the logistic regression would extrapolate (e.g. after a method's outputs changed)."""
"""The ``kind`` of a reliability file, so that no other JSON is mistaken for one."""


def reliability_path(card: ModelCard) -> Path:
    """Where the reliability model of ``card`` lives: ``<card folder>/<card name>.reliability.json``.

    Named after the card's name (the bundled cards' file stem) because a loaded card knows its folder,
    not its file name.
    """
    return Path(card.root) / f"{card.name}.reliability.json"


def case_features(summary: Mapping[str, Any]) -> dict[str, float]:
    """Every reliability feature that ``summary`` (a ``summary.json`` dict) has, by name (table above).

    Non-finite values count as missing.
    """
    features: dict[str, Any] = {}
    for entry in summary.get("explanations") or []:
        if entry.get("method") == "misure":
            features |= {f"misure.{name}": entry.get("scalars", {}).get(name) for name in MISURE_FEATURES}
    scores = summary.get("scores") or {}
    features |= {key: value for key, value in scores.items() if key.endswith((".mean_sa", ".entropy_inside"))}
    if is_finite_number(scores.get("object_volume_ml")):
        features[VOLUME_FEATURE] = math.log1p(max(float(scores["object_volume_ml"]), 0.0))
    return {name: float(value) for name, value in features.items() if is_finite_number(value)}


def feature_words(name: str) -> str:
    """``misure.dilations`` -> ``"MiSuRe's dilations"``: a feature as a reader names it."""
    method, _, key = name.rpartition(".")
    return f"{method_name(method)}'s {key.replace('_', ' ')}" if method else key.replace("_", " ")


def feature_method(name: str) -> str | None:
    """The explain method that yields feature ``name`` (``None``: every run has it)."""
    return None if name == VOLUME_FEATURE else name.partition(".")[0]


@dataclass(frozen=True)
class ReliabilityModel:
    """A fitted logistic regression on standardised features, applied in NumPy.

    Attributes:
        features: feature names, the column order of ``mean``, ``scale`` and ``coef`` (all shape (F,)).
        model: name of the model card whose segmentations it judges.
        target: the class or group whose Dice it predicts.
        dice_threshold: it predicts Dice >= this.
        training: how it was fitted: ``cases``, ``positives``, ``auc_train``, ``auc_cv``, ``accuracy_cv``,
            ``folds``, ``methods``, ``note``.
    """

    features: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    model: str
    target: str
    dice_threshold: float = GOOD_DICE
    training: dict[str, Any] = field(default_factory=dict)

    def matrix(self, cases: Sequence[Mapping[str, float]]) -> np.ndarray:
        """The features of each case (dicts of :func:`case_features`) as a (N, F) array.

        Raises:
            SegXAIError: a case lacks a feature; the message names the method that yields it.
        """
        for features in cases:
            missing = [name for name in self.features if name not in features]
            if missing:
                methods = sorted({feature_method(name) or "?" for name in missing})
                raise SegXAIError(f"the reliability model of {self.model} needs {', '.join(missing)}; explain with "
                                  f"the method(s) {', '.join(methods)} (--methods) to get a reliability")
        return np.asarray([[features[name] for name in self.features] for features in cases],
                          dtype=np.float64).reshape(len(cases), len(self.features))

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Probability of Dice >= :attr:`dice_threshold` for each row of ``x`` (N, F) -> (N,)."""
        logit = ((np.asarray(x, dtype=np.float64) - self.mean) / self.scale) @ self.coef + self.intercept
        return 0.5 * (1.0 + np.tanh(0.5 * logit))  # the logistic function without overflow in exp

    def probability(self, features: Mapping[str, float]) -> float:
        """The probability for one case's :func:`case_features`.

        Raises:
            SegXAIError: a feature is missing, or lies more than :data:`FAR_FROM_TRAINING_SD` training standard
                deviations from the training cases (the message names it and says to fit the model again).
        """
        x = self.matrix([features])
        z = np.abs((x[0] - self.mean) / self.scale)
        if z.max() > FAR_FROM_TRAINING_SD:
            i = int(z.argmax())
            raise SegXAIError(
                f"this case's {feature_words(self.features[i])} ({x[0, i]:.3g}) lies {z[i]:.1f} standard deviations "
                f"from the cases the reliability model of {self.model} was fitted on (mean {self.mean[i]:.3g}, sd "
                f"{self.scale[i]:.3g}): its probability would be a guess; fit it again on cases explained by "
                "this version ('segxai train-reliability')")
        return float(self.predict_proba(x)[0])

    # ------------------------------------------------------------ storage
    def to_dict(self) -> dict[str, Any]:
        return {"kind": FORMAT, "version": 1, "model": self.model, "target": self.target,
                "predicts": f"probability that Dice of {self.target} >= {self.dice_threshold}",
                "dice_threshold": self.dice_threshold, "features": list(self.features),
                "mean": self.mean.tolist(), "scale": self.scale.tolist(), "coef": self.coef.tolist(),
                "intercept": self.intercept, "training": self.training}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "reliability model") -> ReliabilityModel:
        if data.get("kind") != FORMAT:
            raise SegXAIError(f"{source} is not a SegXAI reliability model (no \"kind\": \"{FORMAT}\")")
        try:
            features = tuple(str(name) for name in data["features"])
            arrays = [np.asarray(data[key], dtype=np.float64).reshape(-1) for key in ("mean", "scale", "coef")]
            model = cls(features, *arrays, float(data["intercept"]), str(data["model"]), str(data["target"]),
                        float(data.get("dice_threshold", GOOD_DICE)), dict(data.get("training", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise SegXAIError(f"{source} is missing or has an invalid field ({exc!r}); train it again with "
                              "'segxai train-reliability'") from None
        if not features or any(a.shape != (len(features),) for a in arrays) or not np.all(model.scale > 0):
            raise SegXAIError(f"{source}: features, mean, scale and coef must have one entry per feature, "
                              "scales positive; train it again with 'segxai train-reliability'")
        return model

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ReliabilityModel:
        data = read_json_object(path, "reliability model", "train it again")
        return cls.from_dict(data, source=f"reliability model {path}")


# ------------------------------------------------------------------ fitting (scikit-learn)
def fit_reliability(cases: Sequence[Mapping[str, float]], dice: Sequence[float], model: str, target: str,
                    dice_threshold: float = GOOD_DICE, methods: str = "") -> ReliabilityModel:
    """Fit P(Dice >= ``dice_threshold``) on the features every case has.

    Args:
        cases: :func:`case_features` of each training case.
        dice: Dice of each case's segmentation of ``target`` with its ground truth.
        model, target: the model card's name and the class or group explained.
        methods: the explain methods of the training run (recorded).

    Returns:
        The model, with training AUC and, when each class has at least 2 cases, the AUC and accuracy of
        stratified k-fold predictions (k = min(5, cases of the smaller class)) in ``training``.

    Raises:
        SegXAIError: no cases, no feature shared by all cases, or only one class (all good or all poor).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if not cases or len(cases) != len(dice):
        raise SegXAIError(f"the reliability model needs cases with a Dice each; got {len(cases)} cases, "
                          f"{len(dice)} Dice values")
    shared = set.intersection(*(set(c) for c in cases))
    names = tuple(name for name in cases[0] if name in shared)  # the order case_features gives
    if not names:
        raise SegXAIError("the training cases share no reliability feature; explain them with the same methods")
    y = (np.asarray(dice, dtype=np.float64) >= dice_threshold).astype(int)
    positives = int(y.sum())
    if positives in (0, len(y)):
        raise SegXAIError(f"all {len(y)} training cases have Dice {'>=' if positives else '<'} {dice_threshold}; "
                          "the reliability model needs good and poor segmentations: add cases of the other kind")
    x = np.asarray([[c[name] for name in names] for c in cases], dtype=np.float64)
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x, y)
    scaler, logistic = pipeline[0], pipeline[1]
    training: dict[str, Any] = {"cases": len(y), "positives": positives, "methods": methods,
                                "auc_train": float(roc_auc_score(y, pipeline.predict_proba(x)[:, 1]))}
    folds = min(5, positives, len(y) - positives)
    if folds >= 2:
        split = StratifiedKFold(folds, shuffle=True, random_state=0)
        held_out = cross_val_predict(make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)), x, y,
                                     cv=split, method="predict_proba")[:, 1]
        training |= {"folds": folds, "auc_cv": float(roc_auc_score(y, held_out)),
                     "accuracy_cv": float(accuracy_score(y, held_out >= 0.5))}
    else:
        training |= {"folds": 0, "auc_cv": None, "accuracy_cv": None,
                     "note": "fewer than 2 cases of one class: no cross-validation, the training AUC is optimistic"}
    return ReliabilityModel(names, scaler.mean_.copy(), scaler.scale_.copy(), logistic.coef_[0].copy(),
                            float(logistic.intercept_[0]), model, target, dice_threshold, training)


# ------------------------------------------------------------------ applying (judging a case)
@dataclass(frozen=True)
class ReliabilityJudgement:
    """What the reliability model beside a card says of one case.

    Attributes:
        probability: P(Dice >= the model's threshold), or ``None`` when the model cannot judge this case.
        record: the model's record for ``summary["reliability_model"]`` (file, features, training AUCs),
            ``None`` when it cannot judge.
        reason: why it cannot judge (other target, missing features), for ``summary["not_applicable"]``.
    """

    probability: float | None
    record: dict[str, Any] | None = None
    reason: str | None = None


def judge_reliability(card: ModelCard, target: str, features: Mapping[str, float]) -> ReliabilityJudgement | None:
    """The reliability of a case explained for ``target`` with :func:`case_features` ``features``.

    Returns ``None`` when no reliability model lies beside ``card`` (:func:`reliability_path`). The case
    itself never fails for the model: a case it cannot judge gets a ``reason`` instead of a probability.
    """
    path = reliability_path(card)
    if not path.is_file():
        return None
    reliability = ReliabilityModel.load(path)
    try:
        if target != reliability.target:
            raise SegXAIError(f"the reliability model predicts the Dice of {reliability.target!r}, "
                              f"this run explained {target!r}")
        probability = reliability.probability(features)
    except SegXAIError as reason:
        return ReliabilityJudgement(None, reason=str(reason))
    return ReliabilityJudgement(probability, {"file": str(path), "features": list(reliability.features),
                                              **{k: reliability.training.get(k)
                                                 for k in ("cases", "auc_train", "auc_cv")}})
