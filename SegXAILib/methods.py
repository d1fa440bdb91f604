"""The methods by name (as on the command line): name -> explainer class, imported only when used, and
each method's options, parsed and checked against its typed ``Options``.

Explainers live in :mod:`SegXAILib.explain` and :mod:`SegXAILib.uncertainty`; this table names both, so
neither package needs to import the other.

Options reach a method as ``{"gradcam": {"layer": "bottleneck"}}``: from the command line
(``--option gradcam.layer=bottleneck``, :func:`parse_option_pairs`, values JSON-decoded where they are
JSON, else kept as text) or from a program. Every explainer class names its options as a frozen
dataclass subclass of :class:`~SegXAILib.explain.options.MethodOptions` in its class attribute ``Options``
(declared with :func:`~SegXAILib.explain.options.option`). :func:`check_options` parses and checks every
method's options at once, before any work starts, so a misspelt name or a bad value is a one-line
:class:`SegXAIError` instead of being ignored; explainers read theirs with
:meth:`~SegXAILib.explain.base.ExplainContext.options_for`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from importlib import import_module
from typing import TYPE_CHECKING, Any

from .errors import SegXAIError
from .explain.options import MethodOptions

if TYPE_CHECKING:  # explain.base imports torch: naming and checking methods (the command line's checks) needs none
    from .explain.base import Explainer

__all__ = ["EXPLAINERS", "check_method_names", "check_options", "explainer_class", "get_explainer", "parse_methods",
           "parse_option_pairs"]

EXPLAINERS: dict[str, str] = {
    "gradcam": "SegXAILib.explain.gradcam:SegGradCAM",
    "gradcampp": "SegXAILib.explain.gradcam:SegGradCAMPlusPlus",
    "protoseg": "SegXAILib.explain.protoseg:ProtoSegExplainer",
    "attention": "SegXAILib.explain.attention:AttentionGateMaps",
    "fusion": "SegXAILib.explain.fusion:FusionMaps",
    "mhex": "SegXAILib.explain.mhex:MHEXCAM",
    "misure": "SegXAILib.explain.misure:MiSuRe",
    "occlusion": "SegXAILib.explain.occlusion:OcclusionSensitivity",
    "saliency": "SegXAILib.explain.saliency:Saliency",
    "smoothgrad": "SegXAILib.explain.smoothgrad:SmoothGrad",
    "integrated-gradients": "SegXAILib.explain.integrated_gradients:IntegratedGradients",
    "sequences": "SegXAILib.explain.sequences:SequenceAttribution",
    "mhex-uncertainty": "SegXAILib.uncertainty.collaboration:CollaborationUncertainty",
    "mcdropout": "SegXAILib.uncertainty.sampling:MCDropoutUncertainty",
    "tta": "SegXAILib.uncertainty.sampling:TTAUncertainty",
    "ensemble": "SegXAILib.uncertainty.sampling:EnsembleUncertainty",
}


def _known(name: str) -> str:
    """``name`` if it is a registered method, else a one-line :class:`SegXAIError` listing them."""
    if name not in EXPLAINERS:
        raise SegXAIError(f"unknown method {name!r}; choose from: {', '.join(EXPLAINERS)} (or 'all')")
    return name


def explainer_class(name: str) -> type[Explainer]:
    """The explainer class registered as ``name`` (its module imported now)."""
    module, _, cls = EXPLAINERS[_known(name)].partition(":")
    return getattr(import_module(module), cls)


def get_explainer(name: str) -> Explainer:
    """Instantiate the explainer registered as ``name``."""
    return explainer_class(name)()


def parse_methods(text: str) -> list[str]:
    """``"gradcam,tta"`` or ``"all"`` -> method names, checked against the registry."""
    if text.strip() == "all":
        return list(EXPLAINERS)
    return [_known(m.strip()) for m in text.split(",") if m.strip()]


# ------------------------------------------------------------------ options
def parse_option_pairs(pairs: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["gradcam.layer=bottleneck", "tta.transforms=4"]`` -> ``{"gradcam": {"layer": "bottleneck"}, ...}``.

    Values are JSON-decoded where they are JSON (``4`` -> 4, ``null`` -> None, ``[1,2]`` -> a list), else
    kept as text. Only the form is checked here; names and values by :func:`check_options`.
    """
    options: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        method, dot, name = key.partition(".")
        if not sep or not dot:
            raise SegXAIError(f"bad --option {pair!r}; write METHOD.NAME=VALUE, e.g. gradcam.layer=bottleneck")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        options.setdefault(method, {})[name] = parsed
    return options


def check_method_names(options: Mapping[str, Any]) -> None:
    """Every method that ``options`` gives options for is registered; no explainer is imported (nor torch).

    Raises:
        SegXAIError: the first unknown method (one line).
    """
    for method in options:
        if method not in EXPLAINERS:
            raise SegXAIError(f"options given for unknown method {method!r}; choose from: {', '.join(EXPLAINERS)}")


def check_options(raw: Mapping[str, MethodOptions | Mapping[str, Any]],
                  methods: Sequence[str] | None = None) -> dict[str, MethodOptions]:
    """Parse and check the options of every method in ``raw`` (and defaults for ``methods`` not in it).

    Only the explainer classes named are imported.

    Raises:
        SegXAIError: an unknown method, an unknown option name or a bad value (one line).
    """
    check_method_names(raw)
    parsed: dict[str, MethodOptions] = {}
    for method, given in raw.items():
        parsed[method] = explainer_class(method).Options.of(given, method)
    for method in methods or ():
        if method not in parsed:
            parsed[method] = explainer_class(method).Options()
    return parsed
