"""Reader words: the methods' and maps' names as a radiologist reads them, numbers rounded for reading,
and the glossary of the report (each unit and term explained once).

The command line and ``summary.json`` keep the registry names (``mcdropout``, ``mutual_information``);
pages and panels show these. The module imports nothing of SegXAI, so every layer may use it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["METHOD_NAMES", "TERMS", "Term", "counted", "map_title", "method_name", "readable", "readable_range",
           "terms_used"]

METHOD_NAMES: dict[str, str] = {
    "gradcam": "Grad-CAM",
    "gradcampp": "Grad-CAM++",
    "protoseg": "ProtoSeg",
    "attention": "attention gates",
    "fusion": "fusion gates",
    "mhex": "MHEX+ heads",
    "misure": "MiSuRe",
    "occlusion": "occlusion",
    "saliency": "saliency",
    "smoothgrad": "SmoothGrad",
    "integrated-gradients": "integrated gradients",
    "sequences": "the part of each input scan",
    "mhex-uncertainty": "collaboration-gradient uncertainty",
    "mcdropout": "Monte Carlo dropout",
    "tta": "test-time augmentation",
    "ensemble": "ensemble of models",
}
"""Registry name (``--methods``) -> the name a reader meets on the page."""

VARIANT_NAMES: dict[str, str] = {
    "heat": "unit-average heat map",
    "sr": "sufficient region",
    "msr": "minimally sufficient region",
    "signed": "signed",
    "entropy": "entropy (total uncertainty)",
    "variance": "variance (disagreement)",
    "mutual_information": "mutual information (model uncertainty)",
}
"""Map variant (the part of a map file's name after the method) -> the reader's name; variants not listed
are spelt out (``stage2`` -> ``stage 2``)."""


def method_name(method: str) -> str:
    """The reader's name of a registry method name (the name itself when it has none)."""
    return METHOD_NAMES.get(method, method)


def map_title(method: str, variant: str | None) -> str:
    """``("mcdropout", "mutual_information")`` -> ``"Monte Carlo dropout: mutual information (model uncertainty)"``.

    A ProtoSeg layer map (variant ``layer-<layer>``) is called "one layer's map": its description names the layer.
    """
    if not variant:
        return method_name(method)
    if variant.startswith("layer-"):
        words = "one layer's map"
    else:
        words = VARIANT_NAMES.get(variant) or re.sub(r"(?<=[a-z])(?=\d)", " ", re.sub(r"[-_]+", " ", variant))
    return f"{method_name(method)}: {words}"


def counted(n: int, noun: str) -> str:
    """``counted(1, "check")`` -> ``"1 check"``, ``counted(3, "check")`` -> ``"3 checks"``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def readable(value: float, digits: int = 3) -> str:
    """``value`` rounded to ``digits`` significant digits and at most 4 decimals, never in exponent notation,
    without trailing zeros (0.0873, 52, 0.02).

    A value that rounds to 0 at 4 decimals reads "0" (a map's floor of 2.81e-18 is no information); large
    values get thousands separators (40,300). Non-finite values are spelt as Python spells them.
    """
    if not math.isfinite(value):
        return str(value)
    if abs(value) < 0.5e-4:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    decimals = digits - 1 - magnitude  # negative: round to tens, hundreds ...
    if decimals <= 0:
        return f"{round(value, decimals):,.0f}"
    return f"{value:,.{min(4, decimals)}f}".rstrip("0").rstrip(".")


def readable_range(low: float, high: float, digits: int = 3) -> str:
    """``"0 to 0.17"``: both ends with the decimals of the larger one, so a floor like 2.81e-18 reads 0."""
    scale = max(abs(low), abs(high))
    if not (math.isfinite(low) and math.isfinite(high)) or scale == 0:
        return f"{readable(low, digits)} to {readable(high, digits)}"
    decimals = min(6, max(0, digits - 1 - math.floor(math.log10(scale))))

    def text(value: float) -> str:
        if decimals == 0:
            return readable(value, digits)
        shown = f"{value:,.{decimals}f}".rstrip("0").rstrip(".")
        return "0" if shown == "-0" else shown

    return f"{text(low)} to {text(high)}"


@dataclass(frozen=True)
class Term:
    """One entry of the report's glossary.

    Attributes:
        term: the word as the page uses it.
        meaning: one or two plain sentences; may use ``{classes}`` (number of classes) and ``{max_entropy}``
            (log of it, the largest entropy in nats).
        triggers: the entry is shown when the page's text holds any of these (case-insensitive).
    """

    term: str
    meaning: str
    triggers: tuple[str, ...]


TERMS: tuple[Term, ...] = (
    Term("mL", "millilitre: 1 mL = 1 cubic centimetre = 1,000 cubic millimetres.", ("(mL)", " mL")),
    Term("nats", "the unit of entropy and mutual information (information counted with the natural logarithm). "
         "0 nats = completely sure; with the {classes} classes of this model the largest possible value is "
         "ln {classes} = {max_entropy:.2f} nats (every class equally likely).", ("nats",)),
    Term("log-odds (logits)", "the model's raw score for a class before it is turned into a probability: "
         "log(p / (1 - p)). 0 means a probability of 50%, +2.2 about 90%, -2.2 about 10%; the network's "
         "'logits' are these raw scores.", ("log-odds", "logit")),
    Term("entropy", "total uncertainty of the prediction at a voxel: 0 when one class gets all the "
         "probability, largest when all classes are equally likely.", ("entropy",)),
    Term("mutual information (BALD)", "model uncertainty: the part of the entropy that comes from the "
         "repeated predictions disagreeing with each other, not from the image being ambiguous; 0 = they "
         "agree. BALD is its name in the research literature.", ("mutual information", "bald")),
    Term("variance", "how much the repeated predictions' probability of the target spreads: 0 = identical, "
         "0.25 = half say certainly yes and half certainly no.", ("variance",)),
    Term("Dice", "overlap of two outlines, from 0 (none) to 1 (identical): twice the shared volume divided by "
         "the sum of both volumes.", ("dice",)),
    Term("Grad-CAM", "a map of where one layer of the network found features that raise its score for the "
         "target (gradient-weighted class activation map).", ("grad-cam",)),
    Term("saliency", "a map of where a small change of the scan's brightness would change the model's output "
         "most (the gradient with respect to the input).", ("saliency", "smoothgrad", "integrated gradients")),
    Term("ProtoSeg, segmentation ability (SA)", "how well the features of one network layer, on their own, "
         "separate the object from the rest (a Dice from 0 to 1).", ("protoseg",)),
    Term("MiSuRe", "the smallest part of the scan that, kept alone, still lets the model find the object "
         "(minimally sufficient region).", ("misure",)),
)
"""The glossary, in the order it is shown; only entries whose words appear on the page are shown."""


def terms_used(text: str) -> list[Term]:
    """The entries of :data:`TERMS` that ``text`` (a page's words) uses."""
    lowered = text.lower()
    return [term for term in TERMS if any(trigger.lower() in lowered for trigger in term.triggers)]
