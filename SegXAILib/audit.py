"""Cohort audit: explain every scan of a folder and list the cases most in need of review first.

``segxai audit CASES_DIR --model MODEL --out DIR`` (METHODS.md section 7).

Cases (:func:`find_cases`). ``CASES_DIR`` holds, in any mix:

- case folders, as ``segxai train`` reads them: a sub-folder with ``image.<ext>`` and optionally
  ``label.<ext>`` (ground truth on the scan's grid); the case is named after the folder;
- scan files directly in ``CASES_DIR`` (``.nii.gz``, ``.nii``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``):
  a case without a label, named after the file without its suffix.

Entries whose name starts with ``.`` and folders without ``image.<ext>`` (e.g. ``DIR`` itself when it
lies inside ``CASES_DIR``) are ignored; DICOM series must be converted to one of those formats first.

Outputs in ``DIR``:

- ``cases/<case>/``: the explain outputs of the case (``summary.json``, the segmentation, the maps;
  ``report.html`` only with ``reports=True``, as it costs a few seconds of drawing per case),
  ``thumbnail.png`` for the cohort page, and ``error.txt`` when the case failed;
- ``audit.csv``: one row per case, in :func:`review_order`; columns ``case``, ``status`` (``ok`` or
  ``failed``), ``review_needed``, ``review_reasons`` (the summary's, plus any acquisition outlier of the
  cohort, :func:`flag_image_outliers`), then every case-level score of the summaries
  (``reliability`` first when a reliability model lies beside the card, ``object_volume_ml``,
  ``protoseg.mean_sa``, ``<method>.entropy_inside`` ...), ``target``, ``dice`` (only when some case
  has a label) and ``error``;
- ``scores_vs_dice.csv`` (when labels exist): how well each score predicts Dice, :func:`score_vs_dice`;
- ``audit.html``: the same, self-contained, with one thumbnail per case.

Resuming. A case whose ``cases/<case>/summary.json`` exists is not explained again when that summary
records the same model (name and fingerprint of card and weights), methods and options as this run
(``summary["run"]``, :func:`run_record`); its row is rebuilt from the summary. A case explained with
another model, methods or options is explained again, and the command says so (``CaseRow.redone``).
Delete a case's folder to score it with a reliability model trained after it was explained. A failed
case is tried again.

Failures. One failing case (unreadable scan, a label on another grid, even a bug) is recorded in its
row and ``error.txt`` (with the traceback for anything but a :class:`SegXAIError`); the others go on.

Labels are read only to compute the Dice of the explained target after the explanation: the scores
never see them (they are what the Dice judges), and the ranking uses no Dice.

Where cases run (:func:`run_cases`): one after another in this process by default; with ``workers``
as tasks of a Dask ``LocalCluster`` of that many worker processes with one thread each (and one torch
and OpenMP thread, so N workers use N cores); with ``scheduler`` as tasks of an existing Dask cluster
(the workers need SegXAILib installed and the case and output paths on a shared file system).
GPUs: on a local cluster with CUDA and device ``auto`` or ``cuda``, worker i runs its cases on
``cuda:(i mod number of GPUs)``; ``workers="auto"`` starts one worker per GPU. (dask-cuda's
``LocalCUDACluster`` is not a dependency.) On an existing cluster each worker uses the device given;
start one worker per GPU there yourself, e.g. ``CUDA_VISIBLE_DEVICES=1 dask worker ADDRESS --nthreads 1``.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .errors import Cancelled, SegXAIError
from .fileio import atomic_write_text
from .image_quality import IMAGE_SCORES, MIN_COHORT, OUTLIER_Z, cohort_outliers
from .progress import Progress
from .quality import RELIABILITY_MIN_AUC_CV, is_finite_number, reliability_judges
from .reliability import GOOD_DICE, ReliabilityModel, case_features, fit_reliability, reliability_path
from .volume import FILE_SUFFIXES, Volume, read_volume

__all__ = ["AuditCase", "AuditResult", "AuditSettings", "CaseRow", "audit_case", "classifier_note", "find_cases",
           "flag_image_outliers", "review_order", "run_audit", "run_cases", "score_vs_dice", "train_reliability",
           "write_audit"]

DEFAULT_METHODS = "protoseg,misure,tta"
"""Methods that yield every reliability feature (:mod:`SegXAILib.reliability`) and every case score rule."""

WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
"""Environment of local Dask workers: one thread each, so N workers do not fight over the cores."""

ORDER_SCORES = (("reliability", 1), ("tta.entropy_inside", -1), ("protoseg.mean_sa", 1))
"""Within the cases that need review (and within those that do not), ordered by these scores in turn,
each times its sign, lowest first: the lowest reliability (only where its classifier judges,
:func:`~SegXAILib.quality.reliability_judges`), the highest TTA entropy inside the object, the lowest
mean SA. The entropy comes before mean SA because it predicts a poor Dice far better on the bundled
model's labelled cohort (AUROC for Dice < 0.9: 0.96 against 0.72, docs/auditing.md), and a
model can be confidently wrong: a blurred or re-contrasted scan over-segmented to three times the
lesion keeps a high mean SA, while its repeated predictions disagree."""

ORDER_NOTE = ("Most in need of review first: failed cases (no result at all), then the cases whose scan is unlike "
              "the rest of the cohort (its noise, smoothness or dark-tissue contrast a modified z-score beyond "
              f"{OUTLIER_Z} from the cohort's median, among at least {MIN_COHORT} cases: the model's scores and "
              "thresholds were calibrated on scans of the usual acquisition, so on these their verdict is an "
              "extrapolation), then the cases with a score past its review threshold, then the rest; within each "
              "group the lowest reliability first (when its "
              f"classifier's cross-validated AUROC reaches {RELIABILITY_MIN_AUC_CV}), then the highest "
              "uncertainty inside the object (TTA entropy), then the lowest mean SA \u03bc (missing values "
              "last), then by name. The order uses no Dice.")
"""The order of ``audit.csv`` (:func:`review_order`), as the cohort page states it."""


@dataclass(frozen=True)
class AuditCase:
    """One scan to explain: its name (the output folder's), the scan file and its optional label file."""

    name: str
    image: Path
    label: Path | None = None


@dataclass(frozen=True)
class AuditSettings:
    """How each case is explained (the options of ``segxai explain``), shared by every task.

    Attributes:
        gpus: on a local cluster, worker i uses ``cuda:(i mod gpus)`` (0: ``device`` as given).
        threads: torch threads inside a task (``None``: leave as they are, in-process runs).
        record: what a finished case must have been explained with to be kept on resume (model name and
            fingerprint, methods, options: :func:`run_record`); set by :func:`run_audit`.
        trust_model_code: the user trusts the model's code (``--trust-model-code``): a TorchScript model is
            opened (:mod:`SegXAILib.models.trust`); without it such a model is refused before any case runs.
    """

    model: str
    methods: str = DEFAULT_METHODS
    target: str | None = None
    device: str = "auto"
    fmt: str = "nii.gz"
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    reports: bool = False
    gpus: int = 0
    threads: int | None = None
    record: dict[str, Any] | None = None
    trust_model_code: bool = False


@dataclass
class CaseRow:
    """The audit of one case: a row of ``audit.csv``.

    Attributes:
        status: ``"ok"`` or ``"failed"``.
        scores: ``summary["scores"]`` of the case (``{}`` when it failed).
        review_needed, review_reasons: ``summary["review"]`` (``None`` / ``[]`` when it failed).
        dice: Dice of the explained target with the label, ``None`` without a label.
        earlier: an earlier run had explained it (it was skipped).
        redone: why an earlier run's result was explained again (another model, methods or options), or "".
        reliability_judges: its reliability score may order it (:func:`~SegXAILib.quality.reliability_judges`).
        reliability_model: ``summary["reliability_model"]``, the record of the classifier that scored it.
        unusual_scan: its scan stands out from the cohort's (:func:`flag_image_outliers`).
    """

    case: str
    status: str
    folder: str
    scores: dict[str, Any] = field(default_factory=dict)
    review_needed: bool | None = None
    review_reasons: list[str] = field(default_factory=list)
    target: str = ""
    dice: float | None = None
    has_label: bool = False
    error: str = ""
    earlier: bool = False
    redone: str = ""
    reliability_judges: bool = True
    reliability_model: dict[str, Any] | None = None
    unusual_scan: bool = False


@dataclass
class AuditResult:
    """What :func:`run_audit` wrote: the rows in review order, the score-vs-Dice table and the file paths."""

    rows: list[CaseRow]
    prediction: list[dict[str, Any]]
    csv: Path
    html: Path
    classifier: str | None = None

    @property
    def skipped(self) -> int:
        return sum(row.earlier for row in self.rows)

    @property
    def redone(self) -> list[CaseRow]:
        """The cases an earlier run had explained with another model, methods or options: explained again."""
        return [row for row in self.rows if row.redone]


# ------------------------------------------------------------------ finding cases
def find_cases(root: str | Path) -> list[AuditCase]:
    """The cases of ``root`` (module docstring), sorted by name; paths absolute (workers may run elsewhere).

    Raises:
        SegXAIError: ``root`` is no folder, holds no case, or two cases share a name.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise SegXAIError(f"cases folder not found: {root}; give a folder of scans or of case folders")
    cases = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            images, labels = _scans(entry, "image"), _scans(entry, "label")
            if images:
                cases.append(AuditCase(entry.name, images[0], labels[0] if labels else None))
        elif _suffix(entry.name):
            cases.append(AuditCase(entry.name[: -len(_suffix(entry.name))], entry))
    names = [case.name for case in cases]
    if len(set(names)) < len(names):
        twice = sorted({name for name in names if names.count(name) > 1})
        raise SegXAIError(f"several cases are named {', '.join(twice)} in {root} (a folder and a scan file?); "
                          "rename one of them")
    if not cases:
        raise SegXAIError(f"no scans found in {root}: expected scan files ({', '.join(FILE_SUFFIXES)}) or "
                          "case folders holding image.<ext> [and label.<ext>]")
    return cases


def _suffix(name: str) -> str:
    return next((s for s in FILE_SUFFIXES if name.lower().endswith(s)), "")


def _scans(folder: Path, stem: str) -> list[Path]:
    """``<stem>.<ext>`` files of ``folder`` with a scan suffix (not ``image.json`` or the like)."""
    return [p for p in sorted(folder.glob(f"{stem}.*")) if p.is_file() and p.name[len(stem):].lower() in FILE_SUFFIXES]


# ------------------------------------------------------------------ one case (a task)
def audit_case(case: AuditCase, settings: AuditSettings, folder: Path, progress: Progress | None = None) -> CaseRow:
    """Explain ``case`` into ``folder`` unless done before, draw its thumbnail and compute its Dice.

    Runs in the calling process or as a Dask task. Never raises for a problem of the case (it returns a
    failed row and writes ``folder/error.txt``); only :class:`Cancelled` propagates.
    """
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    redone = _outdated(folder / "summary.json", settings.record)
    earlier = (folder / "summary.json").is_file() and not redone
    try:
        if not earlier:
            if redone:
                (folder / "thumbnail.png").unlink(missing_ok=True)  # of the earlier result
            _explain(case, settings, folder, progress or Progress())
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
        review = summary.get("review") or {}
        row = CaseRow(case.name, "ok", str(folder), dict(summary.get("scores") or {}), bool(review.get("needed")),
                      list(review.get("reasons") or []), summary["target"]["name"], has_label=case.label is not None,
                      earlier=earlier, redone=redone, reliability_judges=reliability_judges(summary),
                      reliability_model=summary.get("reliability_model"))
        segmentation = _thumbnail(summary, folder)
        if case.label is not None:
            row.dice = _target_dice(segmentation, case.label, summary["target"]["labels"])
    except Cancelled:
        raise
    except Exception as exc:  # one bad case must not stop the cohort; error.txt keeps a bug's traceback
        return _failed(case, folder, exc)
    (folder / "error.txt").unlink(missing_ok=True)  # an earlier failure, now resolved
    return row


def run_record(settings: AuditSettings) -> dict[str, Any]:
    """The model (name and :func:`~SegXAILib.models.registry.model_fingerprint`), methods and options of the
    audit, as an explain run records them in ``summary["run"]`` (:func:`SegXAILib.case.run_record`)."""
    from .case import run_record as record
    from .methods import parse_methods
    from .models.registry import resolve_card

    return record(resolve_card(settings.model), parse_methods(settings.methods), settings.options)


def _outdated(summary_path: Path, record: dict[str, Any] | None) -> str:
    """Why the finished case at ``summary_path`` must be explained again for ``record``, or "" to keep it."""
    if record is None or not summary_path.is_file():
        return ""
    try:
        earlier = json.loads(summary_path.read_text(encoding="utf-8")).get("run") or {}
    except (OSError, ValueError, AttributeError):
        return "its summary.json is unreadable"
    changed = [what for key, what in (("model_sha256", "another model"), ("methods", "other methods"),
                                      ("options", "other options")) if earlier.get(key) != record.get(key)]
    return f"explained before with {' and '.join(changed)}" if changed else ""


def _explain(case: AuditCase, settings: AuditSettings, folder: Path, progress: Progress) -> None:
    from .case import run_explain

    device = settings.device
    if settings.gpus:
        from distributed import get_worker

        device = f"cuda:{int(get_worker().name) % settings.gpus}"  # LocalCluster names its workers 0..N-1
    run_explain(str(case.image), settings.model, settings.methods, settings.target, folder, device, settings.fmt,
                progress, options=settings.options, report=settings.reports,
                trust_model_code=settings.trust_model_code)


def _thumbnail(summary: dict[str, Any], folder: Path) -> Volume:
    """Draw ``folder/thumbnail.png`` unless it is there; return the segmentation (on the scan's grid)."""
    from .report.html import summary_scan_path
    from .report.montage import render_thumbnail

    segmentation = read_volume(folder / summary["files"]["segmentation"])
    if not (folder / "thumbnail.png").is_file():
        render_thumbnail(read_volume(summary_scan_path(summary["input"], folder)), segmentation,
                         summary["target"]["labels"], folder / "thumbnail.png")
    return segmentation


def _target_dice(segmentation: Volume, label_path: Path, values: Sequence[int]) -> float:
    """Dice of the target (label ``values``) between the segmentation and the label file."""
    from .metrics import dice

    label = read_volume(label_path)
    if not label.same_grid(segmentation, atol=1e-3):
        raise SegXAIError(f"the label {label_path} is not on the scan's grid (shape, spacing, origin or direction "
                          "differ); give the label that belongs to this scan")
    return dice(np.isin(segmentation.array, values), np.isin(label.array, values))


def _failed(case: AuditCase, folder: Path, exc: BaseException) -> CaseRow:
    """A failed row; ``folder/error.txt`` holds the message (and the traceback of anything unexpected)."""
    expected = isinstance(exc, SegXAIError)
    message = str(exc) if expected else f"{type(exc).__name__}: {exc}"
    atomic_write_text(folder / "error.txt", (message if expected else "".join(traceback.format_exception(exc))) + "\n")
    return CaseRow(case.name, "failed", str(folder), has_label=case.label is not None, error=message)


# ------------------------------------------------------------------ all cases
def run_cases(cases: Sequence[AuditCase], settings: AuditSettings, out: Path, workers: int | str | None = None,
              scheduler: str | None = None, progress: Progress | None = None) -> list[CaseRow]:
    """Audit every case into ``out/cases/<case>``: in-process, or as Dask tasks (module docstring).

    Args:
        workers: start a local cluster of this many worker processes (``"auto"``: one per CUDA GPU).
        scheduler: address of an existing Dask scheduler (e.g. ``tcp://10.0.0.5:8786``).

    Returns:
        One row per case, in order of completion. The progress bar advances once per case.
    """
    if workers is not None and scheduler is not None:
        raise SegXAIError("give either --workers (a local cluster) or --scheduler (an existing one), not both")
    progress = progress or Progress()
    folders = {case.name: Path(out) / "cases" / case.name for case in cases}
    progress.update("audit", 0.0, f"{len(cases)} cases")
    rows: list[CaseRow] = []

    def done(row: CaseRow) -> None:
        rows.append(row)
        progress.update("audit", len(rows) / len(cases), f"{row.case}: {'done before' if row.earlier else row.status}")

    if workers is None and scheduler is None:
        for case in cases:  # the cases' own steps report nothing, but the cancel flag still reaches them
            done(audit_case(case, settings, folders[case.name], Progress(None, progress.cancel_event)))
        return rows
    n_workers, gpus = (0, 0) if scheduler else _local_cluster_size(workers, settings.device)
    settings = replace(settings, threads=1, gpus=gpus)
    with dask_client(n_workers, scheduler) as client:
        from distributed import as_completed

        futures = {client.submit(audit_case, case, settings, folders[case.name], pure=False): case for case in cases}
        for future in as_completed(futures):
            case = futures[future]
            try:
                row = future.result()
            except Exception as exc:  # the task returns its own failures: this is its worker dying (memory, crash)
                row = _failed(case, folders[case.name], exc)
            done(row)
    return rows


SCHEDULER_ADDRESS = re.compile(r"^(?:(?:tcp|tls)://)?(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])"
                               r":(?P<port>[0-9]{1,5})$")
"""A Dask scheduler's address: ``[tcp://|tls://]HOST:PORT``, HOST a name, an IPv4 or a bracketed IPv6 address."""


def check_scheduler_address(address: str | None) -> None:
    """Refuse an address that is no ``[tcp://|tls://]HOST:PORT`` before any case runs (``None``: no scheduler)."""
    if address is None:
        return
    match = SCHEDULER_ADDRESS.match(address)
    if not match or not 1 <= int(match["port"]) <= 65535:
        raise SegXAIError(f"--scheduler {address!r} is not a Dask scheduler address; give HOST:PORT or "
                          "tcp://HOST:PORT with a port from 1 to 65535, e.g. tcp://10.0.0.5:8786")


def _local_cluster_size(workers: int | str, device: str) -> tuple[int, int]:
    """(worker processes, GPUs they share round-robin) of a local cluster."""
    gpus = 0
    if device in ("auto", "cuda"):  # "cuda:N" or "cpu" was chosen explicitly: every worker uses it
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if workers == "auto":
        if not gpus:
            raise SegXAIError("--workers auto starts one worker per CUDA GPU and there is none; give a number")
        return gpus, gpus
    try:
        count = int(workers)
    except ValueError:
        raise SegXAIError(f"--workers must be a number or 'auto', got {workers!r}") from None
    if count < 1:
        raise SegXAIError(f"--workers must be at least 1, got {count}")
    return count, gpus


@contextmanager
def dask_client(workers: int, scheduler: str | None = None) -> Iterator[Any]:
    """A Dask ``Client`` of a new local cluster of ``workers`` processes, or of the cluster at ``scheduler``."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise SegXAIError("running cases on Dask needs dask[distributed]: pip install 'dask[distributed]'") from None
    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except OSError as exc:
            raise SegXAIError(f"cannot reach the Dask scheduler at {scheduler} ({exc}); check the address, "
                              "e.g. tcp://host:8786") from None
        with client:
            yield client
    else:
        try:
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                                   env=WORKER_ENV)
        except RuntimeError as exc:  # "Nanny failed to start": the workers' processes could not start
            raise SegXAIError(f"could not start {workers} Dask worker processes ({exc}); run without --workers, "
                              "or from a script file or the segxai command (workers re-import the main module)"
                              ) from None
        with cluster, Client(cluster) as client:
            yield client


# ------------------------------------------------------------------ tables
def flag_image_outliers(rows: Sequence[CaseRow]) -> list[CaseRow]:
    """``rows`` with those whose scan stands out from the cohort's (:func:`~SegXAILib.image_quality.cohort_outliers`
    on the ``image.*`` scores of the explained cases) marked for review, the reasons added.

    Computed afresh at every write and never stored in a case's summary: it depends on the whole cohort.
    """
    explained = [row for row in rows if row.status == "ok"]
    scores = [{name: float(value) if is_finite_number(value := row.scores.get(f"image.{name}")) else math.nan
               for name in IMAGE_SCORES} for row in explained]
    outlying = {row.case: reasons for row, reasons in zip(explained, cohort_outliers(scores)) if reasons}
    return [replace(row, review_needed=True, review_reasons=[*row.review_reasons, *outlying[row.case]],
                    unusual_scan=True) if row.case in outlying else row for row in rows]


def review_order(row: CaseRow) -> tuple:
    """Sort key of :data:`ORDER_NOTE`: ascending order lists the cases most in need of review first."""
    keys = tuple(sign * float(row.scores[key]) if is_finite_number(row.scores.get(key))
                 and (key != "reliability" or row.reliability_judges) else math.inf for key, sign in ORDER_SCORES)
    return (row.status == "ok", not row.unusual_scan, not row.review_needed, *keys, row.case)


def score_columns(rows: Sequence[CaseRow]) -> list[str]:
    """Every score of ``rows``: ``reliability`` first, then in order of first appearance."""
    keys = list(dict.fromkeys(key for row in rows for key in row.scores))
    return sorted(keys, key=lambda key: key != "reliability")  # stable: the rest keep their order


def csv_rows(rows: Sequence[CaseRow]) -> list[dict[str, str]]:
    """``audit.csv`` as dicts of text, every row with every column (module docstring)."""
    scores = score_columns(rows)
    with_dice = any(row.has_label for row in rows)
    table = []
    for row in rows:
        cells = {"case": row.case, "status": row.status,
                 "review_needed": "" if row.review_needed is None else ("yes" if row.review_needed else "no"),
                 "review_reasons": "; ".join(row.review_reasons)}
        cells |= {key: _text(row.scores.get(key)) for key in scores}
        cells["target"] = row.target
        if with_dice:
            cells["dice"] = _text(row.dice)
        cells["error"] = row.error
        table.append(cells)
    return table


def _text(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def score_vs_dice(rows: Sequence[CaseRow], good_dice: float = GOOD_DICE) -> list[dict[str, Any]]:
    """How well each score predicts the Dice of the explained cases that have a label.

    The comparison of the papers: ProtoSeg's mean SA vs Dice (paper 003), MiSuRe's reliability AUC
    (paper 002). Per score: ``cases``, Spearman's rho and p with Dice (scipy), and the AUROC of the score
    for telling the cases with Dice < ``good_dice`` (sklearn), the score oriented by its review rule
    (:mod:`SegXAILib.quality`): a score reviewed when *below* its threshold counts low values as
    predicting a poor Dice; a score without a rule is taken as is (high = poor). ``auroc`` is that AUROC,
    ``dice_below`` the Dice it calls poor. NaN, with a ``note``,
    when the statistic is undefined (fewer than 3 cases, a constant score, one class only).
    """
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    from .quality import SCORE_RULES, rule_name

    labelled = [row for row in rows if row.status == "ok" and row.dice is not None]
    table = []
    for key in score_columns(labelled):
        pairs = np.asarray([(float(row.scores[key]), row.dice) for row in labelled
                            if is_finite_number(row.scores.get(key))], dtype=np.float64).reshape(-1, 2)
        score, dice = pairs[:, 0], pairs[:, 1]
        rule = rule_name(key.rpartition(".")[2])
        low_is_poor = rule is not None and SCORE_RULES[rule].review == "below"
        notes = []
        rho = p = auroc = math.nan
        if len(score) < 3 or np.ptp(score) == 0 or np.ptp(dice) == 0:
            notes.append("Spearman undefined: fewer than 3 cases, or a constant score or Dice")
        else:
            rho, p = (float(v) for v in spearmanr(score, dice))
        poor = dice < good_dice
        if poor.all() or not poor.any():
            side = "<" if poor.any() else ">="
            notes.append(f"AUROC undefined: all {len(poor)} cases have Dice {side} {good_dice:g}")
        else:
            auroc = float(roc_auc_score(poor, -score if low_is_poor else score))
        table.append({"score": key, "cases": len(score), "spearman_rho": rho, "spearman_p": p,
                      "auroc": auroc, "dice_below": good_dice,
                      "poor_when": "low" if low_is_poor else "high" if rule else "high (no review rule)",
                      "note": "; ".join(notes)})
    return table


def classifier_note(rows: Sequence[CaseRow]) -> str | None:
    """What the reliability classifier that scored the cohort is worth, from its record in the summaries
    (its cross-validated AUROC for telling Dice < 0.9, whether it judges); ``None`` when no case has one."""
    record = next((row.reliability_model for row in rows if row.reliability_model), None)
    if record is None:
        return None
    auc, trained = record.get("auc_cv"), record.get("auc_train")
    judges = reliability_judges({"reliability_model": record})
    return (f"{Path(str(record.get('file', 'reliability model'))).name}, fitted on {record.get('cases', '?')} labelled "
            f"cases: cross-validated AUROC for Dice < {GOOD_DICE:g} "
            f"{f'{auc:.3f}' if is_finite_number(auc) else 'unknown'}"
            + (f" (training {trained:.3f})" if is_finite_number(trained) else "")
            + ("; it flags and orders cases" if judges else
               f"; below {RELIABILITY_MIN_AUC_CV}, so it is shown but neither flags nor orders cases"))


# ------------------------------------------------------------------ the command
def write_audit(out: Path, rows: Sequence[CaseRow], settings: AuditSettings, cases_dir: Path) -> AuditResult:
    """Sort ``rows`` for review and write ``audit.csv``, ``scores_vs_dice.csv`` (with labels), ``audit.html``."""
    from .fileio import write_csv_rows
    from .report.cohort import CohortCase, write_cohort_page

    rows = sorted(flag_image_outliers(rows), key=review_order)
    table = csv_rows(rows)
    csv_path = write_csv_rows(Path(out) / "audit.csv", table)
    prediction = score_vs_dice(rows) if any(row.dice is not None for row in rows) else []
    if prediction:
        write_csv_rows(Path(out) / "scores_vs_dice.csv", [{k: _text(v) for k, v in r.items()} for r in prediction])
    cases = []
    for row, cells in zip(rows, table):
        folder = Path(row.folder)
        thumbnail = folder / "thumbnail.png"
        link = next((f"cases/{row.case}/{name}" for name in ("report.html", "summary.json", "error.txt")
                     if (folder / name).is_file()), None)
        cases.append(CohortCase(cells, thumbnail if row.status == "ok" and thumbnail.is_file() else None, link))
    facts = {"Cases folder": str(cases_dir), "Model": settings.model, "Methods": settings.methods,
             "Cases": f"{len(rows)} ({sum(r.status != 'ok' for r in rows)} failed, "
                      f"{sum(bool(r.review_needed) for r in rows)} to review, "
                      f"{sum(r.dice is not None for r in rows)} with a label)"}
    classifier = classifier_note(rows)
    if classifier:
        facts["Reliability classifier"] = classifier
    html_path = write_cohort_page(Path(out) / "audit.html", facts, cases, prediction, ORDER_NOTE)
    return AuditResult(rows, prediction, csv_path, html_path, classifier)


def run_audit(cases_dir: str | Path, settings: AuditSettings, out: str | Path, workers: int | str | None = None,
              scheduler: str | None = None, progress: Progress | None = None,
              require_labels: bool = False) -> AuditResult:
    """Find the cases of ``cases_dir``, audit each into ``out/cases/`` and write the cohort tables.

    Args:
        require_labels: audit only the cases with a label (``segxai train-reliability``); an error if none.
    """
    from .methods import check_options, parse_methods
    from .models.registry import check_trust, resolve_card

    check_options(settings.options, parse_methods(settings.methods))  # a typo fails before any case runs
    card = resolve_card(settings.model)
    card.target_channels(settings.target)
    check_trust(card, settings.trust_model_code)  # an untrusted TorchScript model, once, not in every case
    check_scheduler_address(scheduler)
    settings = replace(settings, record=run_record(settings))
    cases = find_cases(cases_dir)
    if require_labels:
        cases = [case for case in cases if case.label is not None]
        if not cases:
            raise SegXAIError(f"no case of {cases_dir} has a label: expected case folders holding "
                              "image.<ext> and label.<ext>")
    rows = run_cases(cases, settings, Path(out), workers, scheduler, progress)
    return write_audit(Path(out), rows, settings, Path(cases_dir).resolve())


# ------------------------------------------------------------------ training a reliability model
def train_reliability(cases_dir: str | Path, settings: AuditSettings, out: str | Path | None = None,
                      work: str | Path | None = None, workers: int | str | None = None,
                      scheduler: str | None = None, progress: Progress | None = None) -> tuple[ReliabilityModel, Path]:
    """Audit every labelled case of ``cases_dir``, fit the reliability model on the explanations and save it.

    Args:
        settings: model, methods, device, options, target (default: the card's default target); the saved
            model judges explanations of that target only.
        out: where to save (default :func:`~SegXAILib.reliability.reliability_path` of the card).
        work: folder for the explained cases and their audit (kept, and resumable); default a temporary
            folder removed afterwards.
        workers, scheduler: as :func:`run_audit` (cases as Dask tasks).

    Returns:
        The model and the path it was saved to.
    """
    from .models.registry import resolve_card

    card = resolve_card(settings.model)
    target, _ = card.target_channels(settings.target)
    with tempfile.TemporaryDirectory(prefix="segxai-reliability-") as scratch:
        result = run_audit(cases_dir, settings, Path(work or scratch), workers, scheduler, progress,
                           require_labels=True)
        usable = [row for row in result.rows if row.status == "ok" and row.dice is not None]
        if not usable:
            raise SegXAIError(f"no case of {cases_dir} could be explained; see {result.csv}")
        features = [case_features(json.loads((Path(row.folder) / "summary.json").read_text(encoding="utf-8")))
                    for row in usable]
    reliability = fit_reliability(features, [row.dice for row in usable], card.name, target,
                                  methods=settings.methods)
    failed = [row.case for row in result.rows if row.status != "ok"]
    reliability = replace(reliability, training={**reliability.training, "failed_cases": failed})
    return reliability, reliability.save(out or reliability_path(card))
