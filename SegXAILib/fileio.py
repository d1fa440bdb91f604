"""Our files on disk: atomic writing (a file appears under its final name complete, or not at all),
CSV tables, and JSON objects read with one clear message when they are missing or broken."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import SegXAIError


@contextmanager
def atomic_path(path: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` if the block succeeds.

    ``suffix`` is appended to the temporary name so writers that choose the format by
    extension (SimpleITK, torch) still see it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write(path: Path, write: Callable[[Path], None], suffix: str = "") -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path``."""
    with atomic_path(path, suffix) as tmp:
        write(tmp)
    return Path(path)


class OutputFolder:
    """Collect a command's output files in a hidden staging folder; publish them all at the end.

    Files are written under ``staging`` and moved into ``final`` (created if needed) only when
    the ``with`` block succeeds, so a failed run leaves no partial results and an existing
    folder keeps its previous files except those replaced.
    """

    def __init__(self, final: Path) -> None:
        self.final = Path(final)
        self.staging: Path | None = None

    def __enter__(self) -> OutputFolder:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.", suffix=".part", dir=self.final.parent))
        return self

    def path(self, relative: str) -> Path:
        """Where to write ``relative`` now (inside the staging folder)."""
        assert self.staging is not None, "use OutputFolder in a with block"
        target = self.staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def __exit__(self, exc_type, exc, tb) -> None:
        import shutil

        assert self.staging is not None
        try:
            if exc_type is None:
                for source in sorted(p for p in self.staging.rglob("*") if p.is_file()):
                    target = self.final / source.relative_to(self.staging)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(source, target)
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)


def write_csv_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    """CSV with one row per dict, columns in order of first appearance; written atomically."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, text.getvalue())


def read_json_object(path: str | Path, what: str, fix: str) -> dict[str, Any]:
    """The JSON object stored in ``path``.

    Args:
        what: what the file is, for the message (e.g. "model card").
        fix: what the user should do when the file is unreadable (e.g. "train it again").

    Raises:
        SegXAIError: the file is missing, not JSON, or holds something other than an object.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SegXAIError(f"{what} not found: {path}; check the path") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SegXAIError(f"{what} {path} is not valid JSON ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise SegXAIError(f"{what} {path} does not hold a JSON object; {fix}")
    return data
