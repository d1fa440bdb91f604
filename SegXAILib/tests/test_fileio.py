"""Our file helpers: atomic writes leave nothing half-written; JSON readers say what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from SegXAILib.errors import SegXAIError
from SegXAILib.fileio import atomic_write, read_json_object


def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert list(tmp_path.iterdir()) == []


def test_read_json_object_returns_the_object(tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    path.write_text('{"name": "m", "n": [1, 2]}', encoding="utf-8")
    assert read_json_object(path, "model card", "regenerate it") == {"name": "m", "n": [1, 2]}


@pytest.mark.parametrize(("content", "message"), [
    (None, "model card not found: .*missing.json; check the path"),
    ('{"name": ', "model card .*card.json is not valid JSON .*; regenerate it"),
    (b"\xff\xfe\x00", "model card .*card.json is not valid JSON .*; regenerate it"),
    ("[1, 2]", "model card .*card.json does not hold a JSON object; regenerate it"),
])
def test_read_json_object_names_the_problem_and_the_fix(tmp_path: Path, content: str | bytes | None,
                                                         message: str) -> None:
    path = tmp_path / ("missing.json" if content is None else "card.json")
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(SegXAIError, match=message):
        read_json_object(path, "model card", "regenerate it")
