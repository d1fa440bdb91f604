"""Explain a volume node: write it to a file, run ``segxai explain`` in a child process, load the results.

:class:`ExplainLogic` is the scripting API (Slicer's Python console, the self-test, the tests here) and
what the panel calls. A run never blocks unless asked to: ``run(..., wait=False)`` returns an
:class:`ExplainJob` whose :meth:`ExplainJob.poll` a timer calls on the GUI thread; ``wait=True`` polls
in a loop. Nodes are created only after the child succeeded, so a cancelled or failed run leaves the
scene exactly as it was; a successful one replaces the input's previous results.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import slicer

from SegXAILib.errors import Cancelled, SegXAIError
from SegXAILib.volume import write_volume

from .bridge import volumeFromNode
from .process import ChildProcess, OutputLine, ProgressEvent, childEnvironment, explainCommand
from .results import ExplainResults, findResults, loadResults, removeResults

__all__ = ["ExplainLogic", "ExplainJob", "availableModels", "availableMethods", "modelTargets", "modelDescription",
           "modelTrustQuestion"]

POLL_SECONDS = 0.1
"""How often ``wait=True`` drains the child's output (the panel's timer uses the same period)."""
ERROR_PREFIX = "error: "


class ExplainJob:
    """One ``segxai explain`` run for one input volume.

    ``state``: ``running``, then ``succeeded``, ``failed`` (``error`` says why, in the command line's
    words) or ``cancelled``. ``fraction`` is the progress of the whole run in [0, 1]: the stages are
    preprocessing, inference, resampling and one per method, each an equal share.
    """

    def __init__(self, scene, inputNode, process: ChildProcess, methods: Sequence[str], workDir: Path,
                 outDir: Path, keepOutput: bool, onProgress: Callable[[ProgressEvent], None] | None = None,
                 onLog: Callable[[str], None] | None = None) -> None:
        self.scene = scene
        self.inputNode = inputNode
        self.process = process
        self.stages = ["preprocess", "inference", "resample", *methods]
        self.workDir = workDir
        self.outDir = outDir
        self.keepOutput = keepOutput
        self.onProgress = onProgress
        self.onLog = onLog
        self.state = "running"
        self.fraction = 0.0
        self.error: str | None = None
        self.results: ExplainResults | None = None

    @property
    def running(self) -> bool:
        return self.state == "running"

    def poll(self) -> bool:
        """Handle what the child printed; load the results once it succeeded. ``True`` while running.

        Call it on the thread that owns the scene.
        """
        if not self.running:
            return False
        for message in self.process.poll():
            self._handle(message)
        if self.process.finished:
            for message in self.process.poll():
                self._handle(message)
            self._finish()
        return self.running

    def _handle(self, message: ProgressEvent | OutputLine) -> None:
        if isinstance(message, ProgressEvent):
            if message.stage in self.stages:
                self.fraction = (self.stages.index(message.stage) + message.fraction) / len(self.stages)
            if self.onProgress:
                self.onProgress(message)
        elif self.onLog and message.text.strip():
            self.onLog(message.text)

    def _finish(self) -> None:
        try:
            if self.process.returncode != 0:
                self.state, self.error = "failed", self._childError()
                return
            self.results = loadResults(self.scene, self.inputNode, self.outDir)
            removeResults(self.scene, self.inputNode, keep=self.results.nodes)
            self.state, self.fraction = "succeeded", 1.0
        except SegXAIError as exc:
            self.state, self.error = "failed", str(exc)
        except BaseException:
            self.state, self.error = "failed", "loading the results failed (traceback in the Python console)"
            raise
        finally:
            self._cleanUp()

    def _childError(self) -> str:
        """The command line's ``error: ...`` line, else the end of its stderr (a crash)."""
        errors = [line[len(ERROR_PREFIX):] for line in self.process.stderrLines if line.startswith(ERROR_PREFIX)]
        if errors:
            return errors[-1]
        tail = "\n".join(self.process.stderrLines[-20:])
        return f"segxai explain stopped with exit code {self.process.returncode}:\n{tail}"

    def cancel(self) -> None:
        """Kill the child and its children; the scene is left as it was before the run."""
        if not self.running:
            return
        self.process.kill()
        self.state, self.error = "cancelled", "cancelled by the user"
        self._cleanUp()

    def _cleanUp(self) -> None:
        """Remove the temporary folder this job made (the default output folder lies inside it).

        A caller's ``outDir`` is never removed, nor anything in it: the command line publishes a complete
        result there or leaves the folder as it was (its staging folder is cleaned when the child stops on
        SIGTERM, and swept by the next run after a SIGKILL).
        """
        shutil.rmtree(self.workDir, ignore_errors=True)

    def wait(self) -> ExplainResults:
        """Poll until the run ends; the results, or the run's error raised.

        Raises:
            SegXAIError: the run failed (the command line's message).
            Cancelled: the run was cancelled (also by Ctrl+C here, which kills the child).
        """
        try:
            while self.poll():
                time.sleep(POLL_SECONDS)
        except KeyboardInterrupt:
            self.cancel()
            raise
        if self.state == "cancelled":
            raise Cancelled()
        if self.state == "failed":
            raise SegXAIError(self.error)
        return self.results


class ExplainLogic:
    """Segment and explain volume nodes of a scene with ``segxai explain`` in a child process.

    Args:
        scene: the MRML scene (default: ``slicer.mrmlScene`` when a run starts).
    """

    def __init__(self, scene=None) -> None:
        self._scene = scene
        self.job: ExplainJob | None = None

    @property
    def scene(self):
        return self._scene if self._scene is not None else slicer.mrmlScene

    def run(self, inputVolumeNode, model: str, methods: Sequence[str] | str, targetClass: str | None = None,
            device: str = "auto", wait: bool = True, options: Mapping[str, Mapping[str, object]] | None = None,
            outDir: str | Path | None = None, onProgress: Callable[[ProgressEvent], None] | None = None,
            onLog: Callable[[str], None] | None = None, trustModelCode: bool = False) -> ExplainResults | ExplainJob:
        """Segment ``inputVolumeNode`` and explain ``targetClass`` with each of ``methods``.

        Args:
            inputVolumeNode: a scalar volume node; read, never modified. For a model of several sequences, the
                list of nodes in the model's order (:func:`modelSequences`); the results lie on the first one.
            model: a name from ``segxai models``, a model card (.json) or a MONAI bundle folder.
            methods: method names (``["gradcam", "tta"]``) or a comma-separated string.
            targetClass: class or group name; ``None``: the model card's default (e.g. whole tumour).
            device: ``auto``, ``gpu`` or ``cpu`` (or an explicit torch device such as ``cuda:1``).
            wait: block until done and return the results; ``False`` returns the running job.
            options: per-method options, ``{"gradcam": {"layer": "bottleneck"}}``.
            outDir: keep the command line's output folder here (default: a temporary one, removed); a folder
                of the caller's is never removed, nor a file in it that the run does not write.
            onProgress, onLog: called on this thread with progress events and other output lines.
            trustModelCode: the user trusts the model's code (``--trust-model-code``): a TorchScript model is
                opened; without it such a model is refused before anything runs (:func:`modelTrustQuestion`
                says whether a model needs it; the panel asks the user first).

        Returns:
            ``wait=True``: the :class:`ExplainResults` (``.segmentation``, ``.maps``, ``.nodes``);
            ``wait=False``: the :class:`ExplainJob` (call its ``poll()`` until it returns ``False``).

        Raises:
            SegXAIError: bad input, a run already in progress, or the run failed.
            Cancelled: the run was cancelled.
        """
        if self.job is not None and self.job.running:
            raise SegXAIError("a SegXAI run is in progress; wait for it or cancel it first")
        if isinstance(methods, str):
            methods = [m.strip() for m in methods.split(",") if m.strip()]
        if not methods:
            raise SegXAIError("choose at least one explanation method")
        if not model:
            raise SegXAIError("choose a model: a name from 'segxai models', a model card or a MONAI bundle folder")
        inputNodes = list(inputVolumeNode) if isinstance(inputVolumeNode, (list, tuple)) else [inputVolumeNode]
        inputVolumeNode = inputNodes[0]
        workDir = Path(tempfile.mkdtemp(prefix="SegXAI-"))
        try:
            suffix = inputSuffix(model)
            scanPath = [write_volume(volumeFromNode(node), workDir / f"input{n}{suffix}")
                        for n, node in enumerate(inputNodes)]
            keepOutput = outDir is not None
            outPath = Path(outDir) if keepOutput else workDir / "out"
            process = ChildProcess(explainCommand(scanPath, model, methods, outPath, targetClass, device, options,
                                                  trustModelCode=trustModelCode), childEnvironment(device))
            process.start()
        except BaseException:
            shutil.rmtree(workDir, ignore_errors=True)
            raise
        self.job = ExplainJob(self.scene, inputVolumeNode, process, methods, workDir, outPath, keepOutput,
                              onProgress, onLog)
        return self.job.wait() if wait else self.job

    def cancel(self) -> None:
        """Cancel the running job, if any."""
        if self.job is not None:
            self.job.cancel()

    def results(self, inputVolumeNode) -> ExplainResults | None:
        """The results of ``inputVolumeNode`` in the scene (from this session or a loaded scene)."""
        return findResults(self.scene, inputVolumeNode) if inputVolumeNode is not None else None


# --------------------------------------------------------------- catalogues
def availableModels() -> dict[str, Path]:
    """Model name -> card path for the bundled models and those on ``SEGXAI_MODEL_PATH``."""
    from SegXAILib.models.registry import available_cards

    return available_cards()


def modelsInFolder(folder: str | Path) -> dict[str, str]:
    """Model name -> folder for each model a folder chosen in the panel is or holds: a MONAI bundle, an nnU-Net
    trained-model folder, or the nnU-Net trained-model folders inside it up to two levels deep (an nnU-Net or
    TotalSegmentator results folder: ``DatasetXXX_Name/Trainer__Plans__Configuration``); empty when none. Names are
    the cards' (``segxai models`` lists the same), or the folder's name where its card does not load (selecting it
    then says why)."""
    from SegXAILib.models.registry import card_at, models_in_folder

    found = {}
    for path in models_in_folder(Path(folder)):
        try:
            name = card_at(path).name
        except SegXAIError:
            name = path.name
        found.setdefault(name, str(path))
    return found


def modelTargets(model: str) -> tuple[str | None, list[str]]:
    """The default target and every class and group name a model can explain (background excluded)."""
    from SegXAILib.models.registry import resolve_card

    card = resolve_card(model)
    return card.default_target, card.class_names[0 if card.multilabel else 1:] + list(card.groups)


def inputSuffix(model: str) -> str:
    """The file type the scans go to the child in: NIfTI for a MONAI bundle, which its own ``LoadImaged`` then
    reads as MONAI would (MONAI reads NRRD only with pynrrd or itk); NRRD otherwise (geometry as decimal text)."""
    from SegXAILib.models.registry import resolve_card

    try:
        return ".nii.gz" if resolve_card(model).extra.get("bundle_root") else ".nrrd"
    except SegXAIError:  # the child says why the model does not load
        return ".nrrd"


def modelSequences(model: str) -> list[str]:
    """The scans ``model`` takes, by sequence name in its order (``["scan"]`` for one): the panel shows one input
    selector per name. Reads the card only (a bundle's config as data)."""
    from SegXAILib.models.registry import resolve_card

    return resolve_card(model).sequence_names


def modelDescription(model: str) -> str:
    """What ``model`` is for and where it is known to fail (its card's ``intended_use`` and ``limitations``), as
    plain text for the panel; the description when the card has neither. Reads the card only."""
    from SegXAILib.models.registry import resolve_card

    card = resolve_card(model)
    parts = [f"{title}: {text}" for title, text in (("Intended use", card.intended_use),
                                                      ("Limitations", card.limitations)) if text]
    return "\n".join(parts) if parts else card.description


def modelTrustQuestion(model: str) -> str | None:
    """The question to ask the user before running ``model``, when loading it runs code stored in it (a TorchScript
    model, or a MONAI bundle whose config holds code: the question shows that code); None when it does not.
    Nothing of the model is opened or evaluated."""
    from SegXAILib.models.bundle import code_in_bundle
    from SegXAILib.models.registry import code_files, resolve_card

    card = resolve_card(model)
    files = code_files(card)
    code = code_in_bundle(Path(card.extra["bundle_root"])) if card.extra.get("bundle_root") and not files else []
    if files:
        runs = f"runs code stored in its file {files[0]} (TorchScript)"
    elif code:
        runs = "runs code written in its configuration: " + "; ".join(f"{key} runs {what}" for key, what in code)
    else:
        return None
    return (f"Loading the model {model} {runs}, which can do anything your account can, such as write or delete "
            "files. Run it only if you trust where the model came from. Run it?")


def availableMethods() -> dict[str, str]:
    """Method name -> one line of help, for the methods whose code is present (others are being written)."""
    from importlib import import_module

    from SegXAILib.methods import EXPLAINERS

    methods = {}
    for name, target in EXPLAINERS.items():
        module, _, cls = target.partition(":")
        try:
            methods[name] = getattr(import_module(module), cls).summary
        except (ImportError, AttributeError):
            continue
    return methods
