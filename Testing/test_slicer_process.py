"""The child-process runner on small Python scripts: line parsing, order, exit codes, killing a process tree,
and the ``segxai explain`` command and environment the module builds."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("slicer")  # SegXAILogic's package imports slicer

from SegXAILogic.process import (  # noqa: E402
    ChildProcess,
    OutputLine,
    ProgressEvent,
    childEnvironment,
    explainCommand,
    parseLine,
)


def python(script: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(script)]


def run_to_end(process: ChildProcess, timeout: float = 60) -> list:
    messages, deadline = [], time.monotonic() + timeout
    while not process.finished:
        assert time.monotonic() < deadline, "child did not finish"
        messages += process.poll()
        time.sleep(0.02)
    return messages + process.poll()


def test_parse_line():
    assert parseLine('{"stage": "inference", "fraction": 0.25, "message": "window 1/4"}') == \
        ProgressEvent("inference", 0.25, "window 1/4")
    assert parseLine('{"stage": "gradcam", "fraction": 1}') == ProgressEvent("gradcam", 1.0, "")
    # JSON that is not a progress object, broken JSON and plain text stay lines
    for text in ('{"maps": []}', '{"stage": "x", "fraction"', "wrote out/summary.json", ""):
        assert parseLine(text) == OutputLine("stdout", text)


def test_poll_returns_progress_and_lines_in_order_and_the_exit_code():
    process = ChildProcess(python("""
        import json, sys
        for i in range(3):
            print(json.dumps({"stage": "inference", "fraction": i / 2, "message": f"window {i}"}), flush=True)
        print("maps/gradcam_lesion.nii.gz  where the layer's features raise the logits", flush=True)
        print("error: unknown class 'x'; choose one of: core, rim", file=sys.stderr, flush=True)
        sys.exit(2)
        """))
    process.start()
    messages = run_to_end(process)
    assert process.returncode == 2
    assert [m for m in messages if isinstance(m, ProgressEvent)] == \
        [ProgressEvent("inference", f, f"window {i}") for i, f in enumerate((0.0, 0.5, 1.0))]
    assert OutputLine("stdout", "maps/gradcam_lesion.nii.gz  where the layer's features raise the logits") in messages
    assert process.stderrLines == ["error: unknown class 'x'; choose one of: core, rim"]
    assert process.poll() == []  # drained


@pytest.mark.skipif(os.name != "posix", reason="checks process states through /proc")
def test_kill_ends_the_child_and_its_children(tmp_path):
    """The child starts a grandchild that would sleep for a minute; kill() must end both at once."""
    process = ChildProcess(python("""
        import subprocess, sys, time
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(grandchild.pid, flush=True)
        time.sleep(60)
        """))
    process.start()
    deadline, lines = time.monotonic() + 30, []
    while not lines:
        assert time.monotonic() < deadline
        lines = [m.text for m in process.poll() if isinstance(m, OutputLine) and m.stream == "stdout"]
        time.sleep(0.02)
    pids = [process.pid, int(lines[0])]
    start = time.monotonic()
    process.kill()
    assert time.monotonic() - start < 10 and process.finished and process.returncode != 0

    def alive(pid: int) -> bool:  # a zombie waiting to be reaped counts as dead
        stat = Path(f"/proc/{pid}/stat")
        try:
            return stat.read_text(encoding="utf-8").rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in pids)


def test_explain_command_and_device_environment(tmp_path):
    command = explainCommand(tmp_path / "in.nrrd", "brain-lesion-unet", ["gradcam", "tta"], tmp_path / "out",
                             targetClass="tumour core", device="CPU", options={"tta": {"samples": 2}},
                             python="/opt/Slicer/bin/PythonSlicer")
    assert command == ["/opt/Slicer/bin/PythonSlicer", "-m", "SegXAILib.cli", "explain", str(tmp_path / "in.nrrd"),
                       "--model", "brain-lesion-unet", "--methods", "gradcam,tta", "--out", str(tmp_path / "out"),
                       "--device", "cpu", "--progress", "json", "--target", "tumour core", "--option", "tta.samples=2"]
    assert "--target" not in explainCommand("a", "m", ["gradcam"], "o", python="p")  # the card's default
    assert "--trust-model-code" not in command  # only when the user confirmed it
    assert "--trust-model-code" in explainCommand("a", "m", ["gradcam"], "o", python="p", trustModelCode=True)
    gpu = explainCommand("a", "m", ["gradcam"], "o", device="GPU", python="p")
    assert gpu[gpu.index("--device") + 1] == ("mps" if sys.platform == "darwin" else "cuda")

    base = {"PATH": "/usr/bin", "PYTHONPATH": "/elsewhere", "CUDA_VISIBLE_DEVICES": "0"}
    cpu = childEnvironment("cpu", base)
    assert cpu["CUDA_VISIBLE_DEVICES"] == "-1" and cpu["PATH"] == "/usr/bin" and cpu["PYTHONUNBUFFERED"] == "1"
    engine_root = Path(__file__).resolve().parent.parent  # where this checkout's SegXAILib lives
    assert cpu["PYTHONPATH"].split(os.pathsep) == [str(engine_root), "/elsewhere"]
    assert childEnvironment("auto", base)["CUDA_VISIBLE_DEVICES"] == "0"  # auto and gpu leave the GPUs visible
    assert childEnvironment("gpu", {})["PYTHONPATH"] == str(engine_root)
