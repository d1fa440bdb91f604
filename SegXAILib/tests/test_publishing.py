"""Output folders under hostile conditions (issue 21): nothing lost, nothing overwritten, nothing half-written,
whatever the input, the output folder or a signal (the contract of :class:`SegXAILib.fileio.OutputFolder`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import SegXAILib.case
from SegXAILib.cli import main
from SegXAILib.errors import SegXAIError
from SegXAILib.fileio import JOURNAL, STAGING_PREFIX, OutputFolder, sweep_stale_staging
from SegXAILib.progress import Progress

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str | Path) -> int:
    return main([str(a) for a in args])


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (hidden ones included) and its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def staging_folders(folder: Path) -> list[Path]:
    return sorted(folder.glob(STAGING_PREFIX + "*")) if folder.is_dir() else []


def error_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the case gets as far as loading the model (the check must come before any work)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(SegXAILib.case, "load_model", refuse)


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ------------------------------------------------------------- inputs in the output folder
@pytest.mark.parametrize("case", ["segment scan as segmentation", "explain scan in maps", "explain label in report",
                                  "scan listed by the previous summary", "scan through a symlinked folder"])
def test_an_input_where_the_run_writes_or_removes_is_refused_before_any_work(tmp_path, tiny_card, scan_file,
                                                                             capsys, no_model, case):
    out = tmp_path / "out"
    command = "segment" if case.startswith("segment") or "symlink" in case else "explain"
    place = {"segment scan as segmentation": "segmentation.nii.gz", "explain scan in maps": "maps/x.nii.gz",
             "explain label in report": "report/label.nii.gz", "scan listed by the previous summary": "old.nii.gz",
             "scan through a symlinked folder": "segmentation.nii.gz"}[case]
    target = out / place
    target.parent.mkdir(parents=True)
    target.write_bytes(scan_file.read_bytes())
    if "previous summary" in case:
        (out / "summary.json").write_text(json.dumps({"files": {"segmentation": "old.nii.gz"}}), encoding="utf-8")
    scan, extra = target, []
    if "label" in case:
        scan, extra = scan_file, ["--label", target]
    if "symlink" in case:
        (tmp_path / "alias").symlink_to(out, target_is_directory=True)
        scan = tmp_path / "alias" / place
    before = snapshot(out)
    assert run_cli(command, scan, "--model", tiny_card, "--out", out, "--progress", "none", *extra) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and err[0].startswith("error: the input ") and "lies in the output folder" in err[0]
    assert place in err[0] and "--out" in err[0]
    assert snapshot(out) == before  # the input kept its bytes; nothing was written, no staging folder left


# ------------------------------------------------------------- the output folder itself
@pytest.mark.parametrize("where", ["a file", "below a file"])
def test_out_that_is_or_lies_below_a_file_is_one_error_line_before_any_work(tmp_path, tiny_card, scan_file, capsys,
                                                                            no_model, where):
    blocker = tmp_path / "results"
    blocker.write_text("my results, not a folder\n", encoding="utf-8")
    out = blocker if where == "a file" else blocker / "sub"
    assert run_cli("explain", scan_file, "--model", tiny_card, "--out", out, "--progress", "none") == 2
    err = error_lines(capsys)
    assert len(err) == 1 and err[0].startswith("error: ") and str(blocker) in err[0] and "--out" in err[0]
    assert blocker.read_text(encoding="utf-8") == "my results, not a folder\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["results", scan_file.name, tiny_card.name,
                                                                  "tiny.safetensors"])


def test_out_under_a_folder_that_cannot_be_written_is_one_error_line_before_any_work(tmp_path, tiny_card, scan_file,
                                                                                   capsys, no_model):
    if os.geteuid() == 0:  # chmod does not stop root; a process's folder in /proc cannot take new entries
        out = Path("/proc/self/segxai-out")
        assert not out.exists()
    else:
        parent = tmp_path / "locked"
        parent.mkdir()
        parent.chmod(0o500)
        out = parent / "out"
    try:
        assert run_cli("segment", scan_file, "--model", tiny_card, "--out", out, "--progress", "none") == 2
    finally:
        if os.geteuid() != 0:
            (tmp_path / "locked").chmod(0o700)
    err = error_lines(capsys)
    assert len(err) == 1 and err[0].startswith("error: cannot write in the output folder ") and "--out" in err[0]
    assert not out.exists()


# ------------------------------------------------------------- staging and publishing
def test_staging_lives_inside_out_while_the_case_runs(tmp_path, tiny_card, scan_file):
    out = tmp_path / "out"
    seen = []

    def look(stage, fraction, message):
        seen.append(([p.name for p in out.iterdir()] if out.is_dir() else None,
                     [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]))

    SegXAILib.case.run_segment(str(scan_file), str(tiny_card), out, "cpu", "nii.gz", Progress(look))
    assert seen
    for inside, beside in seen:
        assert len(inside) == 1 and inside[0].startswith(f"{STAGING_PREFIX}") and str(os.getpid()) in inside[0]
        assert beside == []  # nothing staged beside the folder (a rename across file systems would fail)
    assert sorted(snapshot(out)) == ["segmentation.nii.gz", "summary.json"]


def test_a_second_run_removes_the_files_the_first_run_listed_and_keeps_the_users(tmp_path, tiny_card, scan_file):
    out = tmp_path / "out"
    assert run_cli("explain", scan_file, "--model", tiny_card, "--out", out, "--methods", "gradcam,tta",
                   "--progress", "none") == 0
    first = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert len(first["maps"]) == 4 and "report.html" in first["report"]
    assert all((out / f).is_file() for f in first["report"])  # the report was drawn in staging and published
    for mine in ("notes.txt", "maps/notes.txt", "report/mine.png"):
        (out / mine).write_text("the user's own\n", encoding="utf-8")

    assert run_cli("explain", scan_file, "--model", tiny_card, "--out", out, "--methods", "gradcam", "--no-report",
                   "--progress", "none") == 0
    second = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert [m["file"] for m in second["maps"]] == ["maps/gradcam_lesion.nii.gz"] and "report" not in second
    assert sorted(snapshot(out)) == ["maps/gradcam_lesion.nii.gz", "maps/notes.txt", "notes.txt", "report/mine.png",
                                     "segmentation.nii.gz", "summary.json"]


def test_summary_json_is_published_last_after_the_previous_one_is_removed(tmp_path, tiny_card, scan_file,
                                                                           monkeypatch):
    out = tmp_path / "out"
    assert run_cli("segment", scan_file, "--model", tiny_card, "--out", out, "--progress", "none") == 0
    real = os.replace
    published = []

    def record(source, target, *args, **kwargs):
        target = Path(target)
        if target.parent == out or out in target.parents:
            if STAGING_PREFIX not in str(target.relative_to(out)):
                published.append((target.relative_to(out).as_posix(), (out / "summary.json").exists(),
                                  (out / JOURNAL).exists()))
        return real(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", record)
    assert run_cli("segment", scan_file, "--model", tiny_card, "--out", out, "--format", "nrrd",
                   "--progress", "none") == 0
    names = [name for name, _, _ in published]
    assert names == [JOURNAL, "segmentation.nrrd", "summary.json"]
    assert published[1][1:] == (False, True)  # the previous summary was gone before any file moved in
    assert not (out / JOURNAL).exists()
    assert sorted(snapshot(out)) == ["segmentation.nrrd", "summary.json"]  # segmentation.nii.gz was the last run's


def test_an_interrupt_while_the_report_is_drawn_leaves_the_previous_result(tmp_path, tiny_card, scan_file, capsys,
                                                                           monkeypatch):
    import SegXAILib.report.html

    out = tmp_path / "out"
    assert run_cli("explain", scan_file, "--model", tiny_card, "--out", out, "--progress", "none") == 0
    before = snapshot(out)
    capsys.readouterr()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # as Ctrl-C would, after the pictures are drawn

    monkeypatch.setattr(SegXAILib.report.html, "_page", interrupted)
    assert run_cli("explain", scan_file, "--model", tiny_card, "--out", out, "--methods", "tta",
                   "--progress", "none") == 130
    assert error_lines(capsys) == ["error: interrupted (SIGINT, Ctrl-C); no partial output was left"]
    assert snapshot(out) == before


# ------------------------------------------------------------- signals
@pytest.mark.parametrize(("number", "code", "words"), [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                                       (signal.SIGINT, 130, "interrupted (SIGINT, Ctrl-C)")])
def test_a_signal_during_a_run_cleans_staging_and_prints_one_line(tmp_path, tiny_card, scan_file, number, code,
                                                                  words):
    out = tmp_path / "out"
    assert run_cli("segment", scan_file, "--model", tiny_card, "--out", out, "--progress", "none") == 0
    before = snapshot(out)
    proc = subprocess.Popen(
        [sys.executable, "-m", "SegXAILib.cli", "explain", str(scan_file), "--model", str(tiny_card), "--out",
         str(out), "--methods", "misure", "--option", "misure.steps=100000", "--progress", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(), cwd=tmp_path,
        # a shell that starts pytest in the background ignores SIGINT, and the child would inherit that
        # (segxai keeps an ignored signal ignored): give the child the default, as an interactive shell does
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stdout:  # the run is in MiSuRe's optimisation: well past the staging folder's creation
            if json.loads(line)["stage"] == "misure":
                break
        assert len(staging_folders(out)) == 1
        proc.send_signal(number)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code
    assert err.strip().splitlines() == [f"error: {words}; no partial output was left"]
    assert staging_folders(out) == [] and snapshot(out) == before


# ------------------------------------------------------------- SIGKILL while publishing
DRIVER = textwrap.dedent('''
    """Publish run RUN (segmentation.txt and maps/<name>.txt holding RUN, and a summary listing them) into OUT,
    printing every rename and removal first and sleeping before the PAUSE-th (0: never)."""
    import json, os, sys, time
    from pathlib import Path
    from SegXAILib.fileio import OutputFolder

    out, run, maps, pause = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(","), int(sys.argv[4])
    events = 0

    def announce(kind, real):
        def step(path, *args, **kwargs):
            global events
            target = Path(args[0] if kind == "replace" else path)
            if ".segxai-staging-" not in str(target):
                events += 1
                print(f"{kind} {os.path.relpath(target, out)}", flush=True)
                if events == pause:
                    time.sleep(600)
            return real(path, *args, **kwargs)
        return step

    os.replace = announce("replace", os.replace)
    os.unlink = announce("unlink", os.unlink)
    with OutputFolder(out, claims=("segmentation.txt", "maps/*", "summary.json")) as folder:
        folder.path("segmentation.txt").write_text(run)
        for name in maps:
            folder.path(f"maps/{name}.txt").write_text(run)
        folder.path("summary.json").write_text(json.dumps(
            {"run": run, "files": {"segmentation": "segmentation.txt"},
             "maps": [{"file": f"maps/{name}.txt"} for name in maps]}))
    print("done", flush=True)
''')


def complete_run(out: Path) -> str | None:
    """The run whose complete result ``out`` holds, or None when it has no summary.json (by contract incomplete);
    fails when a summary lists a file that is missing or belongs to another run."""
    if not (out / "summary.json").exists():
        return None
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    listed = [*summary["files"].values(), *(m["file"] for m in summary["maps"])]
    assert all((out / f).read_text(encoding="utf-8") == summary["run"] for f in listed), snapshot(out)
    return summary["run"]


def test_sigkill_at_any_point_of_publishing_leaves_a_complete_result_or_none(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER, encoding="utf-8")

    def publish(out: Path, run: str, maps: str, pause: int = 0) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(driver), str(out), run, maps, str(pause)],
                                stdout=subprocess.PIPE, text=True, env=subprocess_env())

    pause, points = 1, []
    while True:
        out = tmp_path / f"kill-{pause}"
        assert publish(out, "A", "a,b,c").wait(timeout=60) == 0
        (out / "notes.txt").write_text("the user's own\n", encoding="utf-8")
        proc = publish(out, "B", "a,d", pause)
        events = []
        for line in proc.stdout:
            events.append(line.strip())
            if len(events) == pause or line.strip() == "done":
                break
        proc.kill()
        proc.wait()
        proc.stdout.close()
        if events[-1] == "done":
            assert complete_run(out) == "B"
            break
        done = events[:-1]  # the last one announced had not happened yet
        expected = "A" if "unlink summary.json" not in done else "B" if "replace summary.json" in done else None
        assert complete_run(out) == expected, (events, snapshot(out))
        assert len(staging_folders(out)) == 1  # left by the killed process
        points.append(events[-1])

        assert publish(out, "C", "e").wait(timeout=60) == 0  # the next run sweeps what either run left
        assert complete_run(out) == "C"
        assert sorted(snapshot(out)) == ["maps/e.txt", "notes.txt", "segmentation.txt", "summary.json"]
        assert staging_folders(out) == []
        pause += 1
    assert points[:2] == [f"replace {JOURNAL}", "unlink summary.json"] and "replace summary.json" in points
    assert "unlink maps/b.txt" in points and points[-1] == f"unlink {JOURNAL}"


def test_the_sweep_removes_only_staging_folders_of_gone_processes_on_this_host(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with OutputFolder(tmp_path / "out") as out:
        own = out.staging.name
    host = own[len(STAGING_PREFIX):].rsplit("-", 2)[0]
    names = {"dead": f"{STAGING_PREFIX}{host}-{gone.pid}-abc", "alive": f"{STAGING_PREFIX}{host}-1-abc",
             "other host": f"{STAGING_PREFIX}elsewhere-{gone.pid}-abc", "not ours": ".segxai-notes"}
    for name in names.values():
        (tmp_path / "out" / name).mkdir()
    assert sweep_stale_staging(tmp_path / "out") == [tmp_path / "out" / names["dead"]]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        names[k] for k in ("alive", "other host", "not ours"))


def test_a_hostile_previous_summary_removes_nothing_outside_the_folder(tmp_path):
    out, outside = tmp_path / "out", tmp_path / "outside.txt"
    outside.write_text("keep\n", encoding="utf-8")
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"files": {"a": "../outside.txt", "b": str(outside),
                                                            "c": f"{STAGING_PREFIX}x/y", "d": ".", "e": "sub"}}),
                                      encoding="utf-8")
    (out / "sub").mkdir()
    (out / "sub" / "mine.txt").write_text("keep\n", encoding="utf-8")
    with OutputFolder(out) as folder:
        folder.path("summary.json").write_text("{}", encoding="utf-8")
    assert outside.read_text(encoding="utf-8") == "keep\n" and (out / "sub" / "mine.txt").is_file()
    assert json.loads((out / "summary.json").read_text(encoding="utf-8")) == {}


def test_a_failed_run_removes_the_folders_it_made_and_nothing_else(tmp_path):
    with pytest.raises(RuntimeError), OutputFolder(tmp_path / "a" / "b" / "out") as folder:
        folder.path("summary.json").write_text("{}", encoding="utf-8")
        raise RuntimeError("the computation failed")
    assert list(tmp_path.iterdir()) == []


def test_a_path_taken_by_a_folder_fails_publishing_in_one_line_and_the_next_run_completes(tmp_path):
    out = tmp_path / "out"
    (out / "segmentation.txt").mkdir(parents=True)  # in the way of a file the run writes
    with pytest.raises(SegXAIError, match=r"cannot publish the results into .*out .*free the path and run again; "
                                          r"until then the folder holds no complete result"):
        with OutputFolder(out) as folder:
            folder.path("segmentation.txt").write_text("new", encoding="utf-8")
            folder.path("summary.json").write_text("{}", encoding="utf-8")
    assert not (out / "summary.json").exists() and staging_folders(out) == []
    (out / "segmentation.txt").rmdir()
    with OutputFolder(out) as folder:
        folder.path("segmentation.txt").write_text("new", encoding="utf-8")
        folder.path("summary.json").write_text('{"files": {"s": "segmentation.txt"}}', encoding="utf-8")
    assert sorted(snapshot(out)) == ["segmentation.txt", "summary.json"]  # the journal is gone with the publication
