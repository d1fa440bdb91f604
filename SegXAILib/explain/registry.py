"""Method name (as on the command line) -> explainer class, imported only when used."""

from __future__ import annotations

from importlib import import_module

from ..errors import SegXAIError
from .base import Explainer

EXPLAINERS: dict[str, str] = {
    "gradcam": "SegXAILib.explain.gradcam:SegGradCAM",
    "gradcampp": "SegXAILib.explain.gradcam:SegGradCAMPlusPlus",
    "protoseg": "SegXAILib.explain.protoseg:ProtoSegExplainer",
    "attention": "SegXAILib.explain.attention:AttentionGateMaps",
    "fusion": "SegXAILib.explain.fusion:FusionMaps",
    "mhex": "SegXAILib.explain.mhex:MHEXCAM",
    "misure": "SegXAILib.explain.misure:MiSuRe",
    "mhex-uncertainty": "SegXAILib.uncertainty.collaboration:CollaborationUncertainty",
    "mcdropout": "SegXAILib.uncertainty.sampling:MCDropoutUncertainty",
    "tta": "SegXAILib.uncertainty.sampling:TTAUncertainty",
    "ensemble": "SegXAILib.uncertainty.sampling:EnsembleUncertainty",
}


def get_explainer(name: str) -> Explainer:
    """Instantiate the explainer registered as ``name``."""
    if name not in EXPLAINERS:
        raise SegXAIError(f"unknown method {name!r}; choose from: {', '.join(EXPLAINERS)} (or 'all')")
    module, _, cls = EXPLAINERS[name].partition(":")
    return getattr(import_module(module), cls)()


def parse_methods(text: str) -> list[str]:
    """``"gradcam,tta"`` or ``"all"`` -> method names, checked against the registry."""
    names = list(EXPLAINERS) if text.strip() == "all" else [m.strip() for m in text.split(",") if m.strip()]
    for name in names:
        if name not in EXPLAINERS:
            raise SegXAIError(f"unknown method {name!r}; choose from: {', '.join(EXPLAINERS)} (or 'all')")
    return names
