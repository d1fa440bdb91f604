"""The SegXAI module's logic that needs MRML but no Qt: importable by tests with slicer-core alone.

- :mod:`.bridge`: volume nodes <-> :class:`SegXAILib.volume.Volume`.
- :mod:`.process`: ``segxai explain`` in a child process, polled without blocking, cancellable.
- :mod:`.results`: the command line's output folder -> segmentation and map nodes; layers in slice views.
- :mod:`.colors`: perceptual colour tables with Slicer's own node IDs; the label table of a segmentation.
- :mod:`.exports`: labelmap file, DICOM SEG, scene bundle (.mrb).
- :mod:`.scores`: case-level scores in words and the "review this case" advice.
- :mod:`.requirements`: the module's Python requirements and which are missing.
- :mod:`.logic`: :class:`ExplainLogic`, the scripting API tying these together.
- :mod:`.standalone`: a scene with Slicer's logics for using all this with slicer-core, without Slicer.
"""

from .bridge import updateNodeFromVolume, volumeFromNode
from .logic import (
    ExplainJob,
    ExplainLogic,
    availableMethods,
    availableModels,
    modelDescription,
    modelSequences,
    modelsInFolder,
    modelTargets,
    modelTrustQuestion,
)
from .results import ExplainResults, findResults, resultNodes, showMap, shownMap

__all__ = ["volumeFromNode", "updateNodeFromVolume", "ExplainLogic", "ExplainJob", "ExplainResults",
           "availableModels", "availableMethods", "modelTargets", "modelSequences", "modelDescription",
           "modelTrustQuestion", "modelsInFolder",
           "findResults", "resultNodes", "showMap", "shownMap"]
