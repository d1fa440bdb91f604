"""``segxai explain`` in a child process that never blocks the caller.

The child is the command line itself (``python -m SegXAILib.cli explain ... --progress json``): one code
path for the terminal and for Slicer. It prints one JSON object per line on stdout; two reader threads
move the stdout and stderr lines into a queue and :meth:`ChildProcess.poll`, called on the GUI thread
by a timer (or in a loop when the caller waits), drains it. The threads only read pipes: MRML and Qt
are touched on the caller's thread alone.

Cancel kills the whole process tree: the child leads its own session (POSIX) or process group
(Windows), so workers it may have started die with it.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import IO, Union

__all__ = ["ProgressEvent", "OutputLine", "ChildProcess", "pythonExecutable", "explainCommand",
           "childEnvironment", "DEVICES"]

DEVICES = ("auto", "gpu", "cpu")
"""The panel's device choices; ``explainCommand`` also passes an explicit ``cuda:N`` or ``mps`` through."""

TERMINATE_GRACE_SECONDS = 5.0
"""How long a cancelled child may take to clean up after SIGTERM before it is killed."""


@dataclass(frozen=True)
class ProgressEvent:
    """One ``--progress json`` line: ``stage`` (e.g. ``inference``, ``gradcam``), its fraction, a message."""

    stage: str
    fraction: float
    message: str = ""


@dataclass(frozen=True)
class OutputLine:
    """Any other line the child printed; ``stream`` is ``stdout`` or ``stderr``."""

    stream: str
    text: str


Message = Union[ProgressEvent, OutputLine]


def parseLine(text: str) -> Message:
    """A stdout line -> :class:`ProgressEvent` when it is a progress object, else :class:`OutputLine`."""
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict) and "stage" in data and "fraction" in data:
            return ProgressEvent(str(data["stage"]), float(data["fraction"]), str(data.get("message", "")))
    return OutputLine("stdout", text)


class ChildProcess:
    """A command in its own process group whose output is read without blocking.

    Args:
        command: program and arguments.
        env: the child's whole environment (``None``: this process's).
    """

    def __init__(self, command: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        self.command = list(command)
        self.env = None if env is None else dict(env)
        self.stderrLines: list[str] = []
        self._queue: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._process: subprocess.Popen | None = None
        self._readers: list[threading.Thread] = []

    def start(self) -> None:
        if os.name == "nt":
            flags = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
            group = {"creationflags": flags}
        else:
            group = {"start_new_session": True}
        self._process = subprocess.Popen(
            self.command, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, encoding="utf-8", errors="replace", bufsize=1, **group)
        self._readers = [threading.Thread(target=self._read, args=(self._process.stdout, "stdout"), daemon=True),
                         threading.Thread(target=self._read, args=(self._process.stderr, "stderr"), daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: IO[str], name: str) -> None:
        """Reader thread: one queue entry per line until the pipe closes."""
        for line in iter(stream.readline, ""):
            line = line.rstrip("\r\n")
            self._queue.put(parseLine(line) if name == "stdout" else OutputLine("stderr", line))
        stream.close()

    def poll(self) -> list[Message]:
        """Everything the child printed since the last call, in order; never blocks."""
        messages = []
        while True:
            try:
                message = self._queue.get_nowait()
            except queue.Empty:
                return messages
            if isinstance(message, OutputLine) and message.stream == "stderr":
                self.stderrLines.append(message.text)
            messages.append(message)

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def finished(self) -> bool:
        """The child exited and both pipes are drained into the queue (a last :meth:`poll` gets the rest)."""
        return (self._process is not None and self._process.poll() is not None
                and not any(reader.is_alive() for reader in self._readers))

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.returncode

    def kill(self, grace: float = TERMINATE_GRACE_SECONDS) -> None:
        """Stop the child and everything it started; returns when they are gone.

        On POSIX the child first gets SIGTERM, on which the command line removes its staging folder and exits
        (143); whatever of its group is still alive after ``grace`` seconds is killed.
        """
        if self._process is None:
            return
        if os.name == "nt":
            if self._process.poll() is None:
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(self._process.pid)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        else:
            try:
                os.killpg(self._process.pid, signal.SIGTERM)
                self._process.wait(timeout=grace)
            except (ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
                pass
            try:  # the group outlives its leader while any member lives: kill it even if the leader exited
                os.killpg(self._process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._process.wait()
        for reader in self._readers:
            reader.join(timeout=5)


def pythonExecutable() -> str:
    """The interpreter for the child: Slicer's ``PythonSlicer``, else this Python (tests, slicer-core).

    Inside Slicer ``sys.executable`` is the application itself; ``PythonSlicer`` (on the PATH Slicer sets,
    as SlicerMONAIAuto3DSeg relies on) runs the same Python environment without the GUI.
    """
    return shutil.which("PythonSlicer") or sys.executable


def deviceArgument(device: str) -> str:
    """Panel choice -> ``--device`` value: ``gpu`` is CUDA (Apple's MPS on macOS); others pass through."""
    choice = device.strip().lower()
    if choice == "gpu":
        return "mps" if sys.platform == "darwin" else "cuda"
    return choice or "auto"


def explainCommand(scanPath: str | os.PathLike | Sequence[str | os.PathLike], model: str, methods: Sequence[str],
                   outDir: str | os.PathLike,
                   targetClass: str | None = None, device: str = "auto",
                   options: Mapping[str, Mapping[str, object]] | None = None,
                   python: str | None = None, trustModelCode: bool = False) -> list[str]:
    """The ``segxai explain`` command line, run as ``python -m SegXAILib.cli`` (``scanPath``: the scan, or one scan
    per sequence of a model that takes several).

    ``trustModelCode`` adds ``--trust-model-code``: the user confirmed that the model's code may run (a
    TorchScript model); the panel asks before setting it.
    """
    scans = [str(scanPath)] if isinstance(scanPath, (str, os.PathLike)) else [str(path) for path in scanPath]
    command = [python or pythonExecutable(), "-m", "SegXAILib.cli", "explain", *scans,
               "--model", str(model), "--methods", ",".join(methods), "--out", str(outDir),
               "--device", deviceArgument(device), "--progress", "json"]
    if targetClass:
        command += ["--target", targetClass]
    if trustModelCode:
        command.append("--trust-model-code")
    for method, values in (options or {}).items():
        for name, value in values.items():
            command += ["--option", f"{method}.{name}={json.dumps(value)}"]
    return command


def childEnvironment(device: str = "auto", base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The child's environment: finds this SegXAILib first, unbuffered output, and the device choice.

    ``cpu`` hides every GPU (``CUDA_VISIBLE_DEVICES=-1``), so nothing in the child (torch, MONAI, CUDA
    libraries) initialises one.
    """
    env = dict(os.environ if base is None else base)
    # The installed extension keeps SegXAILib beside the module, a folder PythonSlicer does not search.
    engineRoot = str(Path(find_spec("SegXAILib").origin).parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([engineRoot] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    if deviceArgument(device) == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = "-1"
    return env
