"""The one exception type that reaches the user.

Every problem caused by the user's input (files, models, options) is raised as
:class:`SegXAIError` with a message that names the problem *and* what to do about it.
The command line prints it as a single ``error: ...`` line and exits with code 2; the
Slicer module shows the same text in its log. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class SegXAIError(Exception):
    """A user-facing error: one line, the problem and the fix."""


class Cancelled(SegXAIError):
    """The user cancelled a running job (the cancel flag was set)."""

    def __init__(self, message: str = "cancelled by the user; nothing was written") -> None:
        super().__init__(message)
