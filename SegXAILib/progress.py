"""Progress reporting and cancellation shared by every long-running step.

A long step receives a :class:`Progress` and calls ``progress.update(stage, fraction)``.
The command line turns those calls into tqdm bars (or JSON lines with
``--progress json`` for the Slicer module); the cancel flag is checked on every update,
so setting it stops the job at the next window, epoch or case.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from typing import TextIO

from .errors import Cancelled

ProgressCallback = Callable[[str, float, str], None]
"""``callback(stage, fraction in [0, 1], message)``."""


class Progress:
    """Forwards ``update`` calls to a callback and raises :class:`Cancelled` once cancelled.

    Args:
        callback: receives ``(stage, fraction, message)``; ``None`` reports nothing.
        cancel_event: a ``threading.Event``; when set, the next ``update`` raises.
    """

    def __init__(
        self,
        callback: ProgressCallback | None = None,
        cancel_event: threading.Event | None = None,
    ) -> None:
        self.callback = callback
        self.cancel_event = cancel_event or threading.Event()

    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def check(self) -> None:
        """Raise :class:`Cancelled` if the cancel flag is set."""
        if self.cancel_event.is_set():
            raise Cancelled()

    def update(self, stage: str, fraction: float, message: str = "") -> None:
        self.check()
        if self.callback is not None:
            self.callback(stage, min(max(float(fraction), 0.0), 1.0), message)


def part_of(progress: Progress, index: int, count: int) -> Progress:
    """A :class:`Progress` for part ``index`` of ``count`` equal parts of a step: its fractions land in
    ``[index / count, (index + 1) / count]`` of ``progress``; cancelling either cancels both."""
    def forward(stage: str, fraction: float, message: str) -> None:
        progress.update(stage, (index + fraction) / count, message)
    return Progress(forward, progress.cancel_event)


class TqdmProgress:
    """A progress callback drawing one tqdm bar per stage (command line, stderr)."""

    def __init__(self, stream: TextIO = sys.stderr, disable: bool = False) -> None:
        self.stream = stream
        self.disable = disable
        self._bar = None
        self._stage: str | None = None

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        from tqdm.auto import tqdm

        if stage != self._stage:
            self.close()
            self._stage = stage
            self._bar = tqdm(total=1000, desc=stage, file=self.stream, disable=self.disable,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")
        bar = self._bar
        bar.n = int(round(fraction * 1000))
        if message:
            bar.set_postfix_str(message, refresh=False)
        bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def json_progress_line(stage: str, fraction: float, message: str = "", stream: TextIO = sys.stdout) -> None:
    """Machine-readable progress: one JSON object per line (read by the Slicer module)."""
    stream.write(json.dumps({"stage": stage, "fraction": round(fraction, 4), "message": message}) + "\n")
    stream.flush()
