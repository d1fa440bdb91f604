"""Our files on disk: atomic writing (a file appears under its final name complete, or not at all), output
folders published whole (:class:`OutputFolder`), CSV tables, and JSON objects read with one clear message when
they are missing or broken."""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
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


STAGING_PREFIX = ".segxai-staging-"
"""Staging folders inside an output folder: ``.segxai-staging-<host>-<pid>-<random>/``."""
JOURNAL = ".segxai-publishing.json"
"""Present only while (or because) a publication was under way: every file either run may have left."""
SUMMARY = "summary.json"


class OutputFolder:
    """Stage a command's output files inside the output folder; publish them together when the ``with`` block ends.

    The contract of an output folder (``segxai segment``, ``explain``, ``demo``, the audit's case folders):

    - **A folder with a** ``summary.json`` **holds one complete result**: every file the summary lists
      (``files``, ``maps``, ``report``) is present and was written by the run that wrote the summary.
      A folder without one holds no complete result (a run was stopped while publishing; run it again).
    - **Nothing is lost**: an input (scan, label, any file of a scan folder) at a path the run may write or
      remove (``claims``, and the files the previous summary lists) is refused before any work, as one
      :class:`SegXAIError`. Of the folder's other files, only those the previous run listed and this run
      does not write are removed: a user's own file stays.
    - **Nothing half-written**: files are written under ``.segxai-staging-<host>-<pid>-<random>/`` inside the
      output folder (so publishing is a rename on one file system, a bind mount included); a failure,
      ``Ctrl-C`` or ``SIGTERM`` before publishing removes the staging folder and leaves the folder as it was
      (folders the run made are removed again when left empty). A staging folder left by a killed process
      (``SIGKILL``, power loss) is removed by the next run into the folder once its process is gone.
    - **The output folder is checked on entering**, before the caller computes anything: a file in its place,
      a file among its parents or a folder that cannot be written is one :class:`SegXAIError`.

    Publishing, in this order (``SIGINT``/``SIGTERM`` are deferred until it ends when they can be):
    1. ``.segxai-publishing.json`` lists every file of the previous run (its summary, and the journal of a
       publication stopped before) and of this run;
    2. the previous ``summary.json`` is removed: from here on the folder is incomplete by contract;
    3. every staged file but ``summary.json`` is renamed into place (``os.replace``);
    4. the files the journal lists that this run did not write are removed (and folders they leave empty);
    5. ``summary.json`` is renamed into place, last; then the journal is removed.
    A process killed at any point leaves either the previous complete result, a folder without
    ``summary.json``, or the new complete result; the journal lets the next run remove what either run left.
    A command that writes no ``summary.json`` (``synth-lesion``, ``ct-phantom``) only replaces its files.

    Args:
        final: the output folder.
        inputs: the files (or folders) the run reads; refused when they lie where the run writes or removes.
        claims: glob patterns (relative to ``final``, ``/``-separated) of every file the run may write.
        listed: the files a summary lists (default :func:`summary_files`).
    """

    def __init__(self, final: Path, inputs: Iterable[str | Path | None] = (), claims: Iterable[str] = (),
                 listed: Callable[[dict[str, Any]], Iterable[str]] | None = None) -> None:
        self.final = Path(os.path.abspath(final))
        self.inputs = [Path(p) for p in inputs if p is not None and str(p) != ""]
        self.claims = tuple(claims)
        self.listed = listed or summary_files
        self.staging: Path | None = None
        self._made: list[Path] = []  # folders this run created, outermost first

    # -------------------------------------------------------------- entering
    def __enter__(self) -> OutputFolder:
        check_output_folder(self.final)
        self._refuse_inputs(self.claims, self._previous_files())
        self._made = [p for p in [*reversed(self.final.parents), self.final] if not p.exists()]
        try:
            self.final.mkdir(parents=True, exist_ok=True)
            self.staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{_host()}-{os.getpid()}-",
                                                 dir=self.final))
        except OSError as exc:
            self._remove_made_folders()
            raise SegXAIError(f"cannot write in the output folder {self.final} ({exc.strerror or exc}); "
                              "give a folder you can write to (--out)") from None
        sweep_stale_staging(self.final)
        return self

    def path(self, relative: str) -> Path:
        """Where to write ``relative`` now (inside the staging folder)."""
        assert self.staging is not None, "use OutputFolder in a with block"
        target = self.staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def staged(self) -> list[str]:
        """The relative (``/``-separated) paths of the files staged so far."""
        assert self.staging is not None, "use OutputFolder in a with block"
        return sorted(p.relative_to(self.staging).as_posix() for p in self.staging.rglob("*")
                      if p.is_file() or p.is_symlink())

    # -------------------------------------------------------------- leaving
    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.staging is not None
        published = False
        try:
            if exc_type is None:
                with _signals_deferred():
                    self._publish()
                published = True
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)
            if not published:
                self._remove_made_folders()

    def _publish(self) -> None:
        staging = self.staging
        assert staging is not None
        staged = self.staged()
        self._refuse_inputs((), set(staged))  # a safety net: the claims should have caught it before any work
        writes_summary = SUMMARY in staged
        previous = self._previous_files() if writes_summary else set()
        stale = sorted(previous - set(staged) - {SUMMARY})
        incomplete = False
        try:
            if writes_summary:
                journal = staging / JOURNAL  # written in staging: a kill leaves no part-written journal here
                journal.write_text(json.dumps({"files": sorted(previous | set(staged))}) + "\n", encoding="utf-8")
                os.replace(journal, self.final / JOURNAL)
                incomplete = True
                (self.final / SUMMARY).unlink(missing_ok=True)
            for relative in staged:
                if relative != SUMMARY:
                    target = self.final / relative
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(staging / relative, target)
            for relative in stale:
                self._remove(relative)
            if writes_summary:
                os.replace(staging / SUMMARY, self.final / SUMMARY)
                (self.final / JOURNAL).unlink(missing_ok=True)
        except OSError as exc:
            state = "; until then the folder holds no complete result (no summary.json)" if incomplete else ""
            raise SegXAIError(f"cannot publish the results into {self.final} ({exc}); free the path and run "
                              f"again{state}") from None

    def _remove(self, relative: str) -> None:
        """Remove a file of the previous run, and the folders inside ``final`` it leaves empty."""
        target = self.final / relative
        if not _inside(target.parent, self.final) or (target.is_dir() and not target.is_symlink()):
            return
        target.unlink(missing_ok=True)
        for folder in target.parents:
            if folder == self.final or not _inside(folder, self.final):
                break
            try:
                folder.rmdir()
            except OSError:
                break

    def _remove_made_folders(self) -> None:
        for folder in reversed(self._made):
            try:
                folder.rmdir()
            except OSError:
                break

    # -------------------------------------------------------------- inputs
    def _previous_files(self) -> set[str]:
        """The files the previous summary and an unfinished publication's journal list (safe relative paths)."""
        files: set[str] = set()
        for name, reader in ((SUMMARY, self.listed), (JOURNAL, lambda data: data.get("files") or [])):
            try:
                data = json.loads((self.final / name).read_text(encoding="utf-8"))
                files.update(p for p in (_safe_relative(item) for item in reader(data)) if p)
            except (OSError, ValueError, TypeError, AttributeError, KeyError):
                continue  # no (readable) record: nothing of it is removed
        return files

    def _refuse_inputs(self, patterns: Iterable[str], files: set[str]) -> None:
        """Raise if an input lies where the run writes (``patterns``) or removes (``files``)."""
        patterns = (*patterns, SUMMARY, JOURNAL, STAGING_PREFIX + "*")
        roots = {os.path.abspath(self.final), os.path.realpath(self.final)}
        for given in self.inputs:
            for path in _files_of(given):
                for form in {os.path.abspath(path), os.path.realpath(path)}:
                    for root in roots:
                        if not form.startswith(root + os.sep):
                            continue
                        relative = Path(os.path.relpath(form, root)).as_posix()
                        if relative in files or any(fnmatch.fnmatchcase(relative, p) for p in patterns):
                            raise SegXAIError(
                                f"the input {given} lies in the output folder {self.final} as {relative}, which "
                                "this run writes or replaces; give another output folder (--out) or move the "
                                "input out of it")


def check_output_folder(folder: Path) -> None:
    """Raise :class:`SegXAIError` when ``folder`` cannot be an output folder: a file, or below a file."""
    folder = Path(os.path.abspath(folder))
    try:
        if folder.exists() and not folder.is_dir():
            raise SegXAIError(f"the output folder {folder} is a file; give a folder (--out), or move the file away")
        for parent in folder.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise SegXAIError(f"cannot make the output folder {folder}: {parent} is a file, not a folder; "
                                      "give another output folder (--out)")
                break
    except OSError as exc:
        raise SegXAIError(f"cannot use the output folder {folder} ({exc.strerror or exc}); give a folder you can "
                          "write to (--out)") from None


def summary_files(summary: dict[str, Any]) -> list[str]:
    """The files a ``summary.json`` lists: its ``files`` values, each map's and class's ``file`` and its ``report``
    list."""
    files = [str(v) for v in (summary.get("files") or {}).values()]
    files += [str(item["file"]) for item in summary.get("maps") or [] if isinstance(item, dict) and "file" in item]
    files += [str(item["file"]) for item in summary.get("classes") or [] if isinstance(item, dict) and "file" in item]
    return files + [str(v) for v in summary.get("report") or []]


def sweep_stale_staging(folder: Path) -> list[Path]:
    """Remove the staging folders in ``folder`` whose process (on this host) is gone; return them."""
    removed = []
    if os.name == "nt":  # os.kill(pid, 0) would end the process there
        return removed
    pattern = re.compile(re.escape(STAGING_PREFIX) + r"(?P<host>.*)-(?P<pid>\d+)-[^-]*")
    for entry in Path(folder).glob(STAGING_PREFIX + "*"):
        match = pattern.fullmatch(entry.name)
        if (match and entry.is_dir() and not entry.is_symlink() and match["host"] == _host()
                and int(match["pid"]) != os.getpid() and not _alive(int(match["pid"]))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "", socket.gethostname())[:64] or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process, or we may not ask: keep its folder
    return True


def _inside(path: Path, folder: Path) -> bool:
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return real == root or real.startswith(root + os.sep)


def _safe_relative(item: Any) -> str | None:
    """``item`` as a plain relative path inside a folder, or None (absolute, ``..``, our own names)."""
    if not isinstance(item, str) or not item or "\\" in item or "\0" in item:
        return None
    path = PurePosixPath(item)
    if path.is_absolute() or any(part in ("..", ".", "") for part in item.split("/")):
        return None
    if path.parts[0].startswith(STAGING_PREFIX) or path.as_posix() in (JOURNAL, SUMMARY):
        return None
    return path.as_posix()


def _files_of(path: Path) -> list[Path]:
    """``path`` and, for a folder, every file below it."""
    if path.is_dir():
        return [path, *(p for p in path.rglob("*") if not p.is_dir())]
    return [path]


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while the block runs (main thread only); deliver them after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {}
    for number in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(number)
        if handler is not None and handler is not signal.SIG_IGN:  # None: not set from Python, leave it
            previous[number] = signal.signal(number, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in pending[:1]:
            signal.raise_signal(number)


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
