"""SegXAILib: the SegXAI engine. Segment a 3D scan and explain the segmentation.

Independent of 3D Slicer: torch, MONAI, NumPy, SimpleITK. In a notebook::

    import SegXAILib as sx
    scan = sx.read_volume("image.nii.gz")
    model = sx.load_model("brain-lesion-unet")
    case = sx.explain_case(scan, model, ["gradcam", "tta"])
    print(case.verdict.review["needed"], [m.name for e in case.run.explanations for m in e.maps])

The names below are imported when first used, so ``import SegXAILib.volume`` (as the Slicer module
does) does not import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .version import __version__

if TYPE_CHECKING:
    from .case import CaseResult, explain_case
    from .errors import SegXAIError
    from .explain.pipeline import ExplainResult
    from .inference import SegmentationResult, segment
    from .methods import parse_methods
    from .models.loaders import LoadedModel
    from .models.registry import available_cards, load_model
    from .verdict import CaseVerdict, judge_case
    from .volume import Volume, read_volume, write_volume

EXPORTS: dict[str, str] = {
    "read_volume": "volume", "write_volume": "volume", "Volume": "volume",
    "available_cards": "models.registry", "load_model": "models.registry", "LoadedModel": "models.loaders",
    "parse_methods": "methods",
    "segment": "inference", "SegmentationResult": "inference",
    "explain_case": "case", "CaseResult": "case", "ExplainResult": "explain.pipeline",
    "judge_case": "verdict", "CaseVerdict": "verdict",
    "SegXAIError": "errors",
}
"""Public name -> the module (under SegXAILib) that defines it."""

__all__ = ["__version__", "read_volume", "write_volume", "Volume", "available_cards", "load_model", "LoadedModel",
           "parse_methods", "segment", "SegmentationResult", "explain_case", "CaseResult", "ExplainResult",
           "judge_case", "CaseVerdict", "SegXAIError"]


def __getattr__(name: str) -> Any:
    if name not in EXPORTS:
        raise AttributeError(f"module 'SegXAILib' has no attribute {name!r}")
    value = getattr(import_module(f".{EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
