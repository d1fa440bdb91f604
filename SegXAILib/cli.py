"""The ``segxai`` command line: argument parsing and printing only; each command calls into the library
(a case: :mod:`SegXAILib.case`). No module imports this one.

Every user error ends as one ``error: ...`` line on stderr and exit code 2, with no output
files left behind (outputs are staged inside the output folder and published only when a command
succeeds: :class:`SegXAILib.fileio.OutputFolder`). Ctrl-C (SIGINT) and SIGTERM end a command with one
``error:`` line and exit code 130 or 143, after its staging folder is removed.

Arguments, input paths, method names and model names are checked before torch is imported (importing
torch and MONAI takes seconds): each command checks what needs no torch first, then imports the library.
Only ``--help`` of a command that takes ``--methods`` imports the explainers, to list them and their options.
"""

from __future__ import annotations

import argparse
import signal
import sys
import textwrap
import threading
from collections.abc import Callable, Sequence
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from .errors import Cancelled, SegXAIError
from .progress import Progress, TqdmProgress, json_progress_line

DEFAULT_MODEL = "brain-lesion-unet"
MODEL_HELP = "name from 'segxai models', card .json, MONAI bundle folder, nnU-Net model or results folder"
TRUST_HELP = ("open a model whose loading runs code stored in it (a TorchScript file: torch.jit.load runs the "
              "archive's code; a MONAI bundle whose config holds Python expressions or calls other than MONAI "
              "and torch.nn classes); only for a model from a source you trust")
DEVICE_HELP = "auto (cuda, mps, cpu), cpu, cuda, cuda:N, mps"
FORMATS = ("nii.gz", "nrrd", "nii", "mha")
"""The single-file formats the commands write volumes in (``--format``)."""


# ------------------------------------------------------------------ helpers
def _progress(args: argparse.Namespace) -> Progress:
    mode = getattr(args, "progress", "bar")
    if mode == "json":
        return Progress(json_progress_line)
    return Progress(TqdmProgress(disable=mode == "none"))


def _options(args: argparse.Namespace) -> dict[str, dict]:
    """``--option METHOD.NAME=VALUE`` pairs, checked against the methods' declared options."""
    from .methods import check_options, parse_option_pairs

    options = parse_option_pairs(args.option)
    check_options(options)
    return options


# ------------------------------------------------ checks made before torch is imported
SCAN_HELP = ("NIfTI/NRRD/MHA file or DICOM series folder; a model of several sequences (e.g. T1c T1 T2 FLAIR) takes "
             "one co-registered scan per sequence, in the order `segxai models` lists")


def _require(path: str | list[str] | None, what: str) -> None:
    """Raise the one-line error for a missing input ``path`` (``None``: not given, nothing to check; a list: each)."""
    for one in [path] if isinstance(path, str) else path or []:
        if not Path(one).exists():
            raise SegXAIError(f"{what} not found: {one}; check the path")


def _check_methods(args: argparse.Namespace) -> None:
    """``--methods`` and the methods named by ``--option``: names only (their option values need the explainers'
    code, checked once it is imported)."""
    from .methods import check_method_names, parse_methods, parse_option_pairs

    parse_methods(args.methods)
    check_method_names(parse_option_pairs(getattr(args, "option", [])))


def _check_model(args: argparse.Namespace, target: str | None = None, check_target: bool = False) -> None:
    """The model named by ``--model`` exists (a bundle folder's card is read when it is loaded; a folder holding
    several nnU-Net models is refused), takes as many scans as given and, with ``check_target``, has the class or
    group ``target`` (``None``: its default)."""
    from .models.registry import model_folder, resolve_card

    if Path(args.model).is_dir():
        model_folder(Path(args.model))
        return
    from .preprocessing import check_scan_count

    card = resolve_card(args.model)
    scans = getattr(args, "scan", None)  # the commands that take scans
    if scans is not None:
        check_scan_count(len(scans), card.sequence_names, card.name)
    if check_target:
        card.target_channels(target)


def _check_output_folder(out: str) -> None:
    from .fileio import check_output_folder

    check_output_folder(Path(out))


# ----------------------------------------------------------------- commands
def cmd_models(args: argparse.Namespace) -> int:
    from .models.registry import available_cards, card_at

    cards = available_cards()
    if not cards:
        print("no models found (bundled folder empty and SEGXAI_MODEL_PATH unset)")
        return 0
    for name, path in cards.items():
        card = card_at(path)
        dice = card.validation.get("dice", {})
        main = dice.get(card.default_target or "", None)
        print(f"{name:28s} {card.architecture.get('name', '?'):16s} {card.modality:8s} "
              f"classes: {', '.join(card.class_names[0 if card.multilabel else 1:])}"
              + (f"  val Dice {card.default_target}: {main:.3f}" if main is not None else ""))
        print(f"{'':28s} {path}")
        for label, text in (("intended use", card.intended_use), ("limitations", card.limitations)):
            if text:
                print(f"{'':28s} {label}: {text}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    _check_methods(args)
    options = _options(args)  # imports the explainers given --option (and torch) only when there are some
    _check_output_folder(args.out)
    _require(args.scan, "file")
    _require(args.label, "label file")
    _check_model(args, args.target, check_target=True)
    from .case import run_explain

    summary = run_explain(args.scan, args.model, args.methods, args.target, Path(args.out), args.device,
                          args.format, _progress(args), args.label, options,
                          report=not args.no_report, trust_model_code=args.trust_model_code)
    for item in summary["maps"]:
        print(f"{item['file']:48s} {item['description']}")
    for method, reason in summary["not_applicable"].items():
        print(f"{method}: not applicable: {reason}")
    for key, value in summary["scores"].items():
        print(f"{key:32s} {value}")
    print(f"wrote {Path(args.out) / 'summary.json'}")
    if not args.no_report:
        print(f"report: {Path(args.out) / 'report.html'}")
    return 0


def cmd_evaluate_maps(args: argparse.Namespace) -> int:
    _require(args.folder, "explain output folder")
    if args.model is not None:
        _check_model(args)
    from .faithfulness import evaluate_maps

    model = args.model
    if args.trust_model_code:  # loaded here, trusted; evaluate_maps checks it is the summary's model
        from .fileio import read_json_object
        from .models.registry import load_model

        summary = Path(args.folder) / "summary.json"
        name = model or (read_json_object(summary, "explain summary", "give the output folder of 'segxai explain'")
                         .get("model") or {}).get("name")
        model = load_model(name, trust_model_code=True) if name else model
    rows = evaluate_maps(Path(args.folder), model, steps=args.steps, device=args.device, baseline=args.baseline,
                         progress=_progress(args))
    for row in rows:
        print(f"{row['map']:48s} Dice explained (map > 0.1) {row['dice_explained_gt0.1']:.3f}  deletion AUC "
              f"{row['deletion_auc_probability']:.3f}  insertion AUC {row['insertion_auc_probability']:.3f}")
    print(f"wrote {Path(args.folder) / 'faithfulness.csv'}")
    return 0


def _audit_settings(args: argparse.Namespace, options: dict[str, dict], **extra):
    """How ``audit`` and ``train-reliability`` explain each case (:class:`SegXAILib.audit.AuditSettings`)."""
    from .audit import AuditSettings

    return AuditSettings(args.model, args.methods, device=args.device, options=options,
                         trust_model_code=args.trust_model_code, **extra)


def _check_cohort(args: argparse.Namespace, target: str | None = None,
                  check_target: bool = False) -> dict[str, dict]:
    """The checks of ``audit`` and ``train-reliability`` before any case; the parsed ``--option`` pairs."""
    _check_methods(args)
    options = _options(args)  # imports the explainers given --option (and torch) only when there are some
    _require(args.cases, "cases folder")
    _check_model(args, target, check_target)
    return options


def cmd_audit(args: argparse.Namespace) -> int:
    options = _check_cohort(args, args.target, check_target=True)
    _check_output_folder(args.out)
    from .audit import run_audit

    settings = _audit_settings(args, options, target=args.target, fmt=args.format, reports=args.reports)
    result = run_audit(args.cases, settings, Path(args.out), args.workers, args.scheduler, _progress(args))
    failed = [row for row in result.rows if row.status != "ok"]
    print(f"audited {len(result.rows)} cases: {result.skipped} done by an earlier run, {len(failed)} failed, "
          f"{sum(bool(row.review_needed) for row in result.rows)} to review")
    for row in result.redone:
        print(f"explained {row.case} again: {row.redone}")
    for row in failed:
        print(f"failed {row.case}: {row.error}")
    if result.classifier:
        print(f"reliability classifier: {result.classifier}")
    for row in result.prediction:
        print(f"{row['score']:32s} Spearman rho with Dice {row['spearman_rho']:6.3f}  "
              f"AUROC (Dice < {row['dice_below']:g}) {row['auroc']:.3f}  "
              f"({row['cases']} cases)")
    print(f"wrote {result.csv} and {result.html}")
    return 0


def cmd_train_reliability(args: argparse.Namespace) -> int:
    options = _check_cohort(args)
    from .audit import train_reliability

    model, path = train_reliability(args.cases, _audit_settings(args, options), args.out, args.work, args.workers,
                                    args.scheduler, _progress(args))
    info = model.training
    print(f"trained on {info['cases']} cases ({info['positives']} with {model.target} Dice >= "
          f"{model.dice_threshold:g}); features: {', '.join(model.features)}")
    if info.get("auc_cv") is not None:
        print(f"cross-validated ({info['folds']}-fold) AUC {info['auc_cv']:.3f}, accuracy {info['accuracy_cv']:.3f}; "
              f"training AUC {info['auc_train']:.3f}")
    else:
        print(f"training AUC {info['auc_train']:.3f} ({info['note']})")
    if info["failed_cases"]:
        print(f"left out (failed): {', '.join(info['failed_cases'])}")
    print(f"wrote {path}")
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    _check_output_folder(args.out)
    _require(args.scan, "file")
    _check_model(args)
    from .case import run_segment

    summary = run_segment(args.scan, args.model, Path(args.out), args.device, args.format,
                          _progress(args), trust_model_code=args.trust_model_code)
    for c in summary["classes"][0 if summary.get("labelmap") else 1:]:
        print(f"{c['name']:24s} {c['voxels']:9d} voxels {c['volume_ml']:9.2f} mL")
    print(f"wrote {Path(args.out) / summary['files']['segmentation']} and {Path(args.out) / 'summary.json'}")
    return 0


def _check_host(host: str | None) -> None:
    """``host`` is a sample name or an existing scan (``None``: the default sample)."""
    from .data.samples import SAMPLE_HOSTS

    if host is not None and host not in SAMPLE_HOSTS and not Path(host).exists():
        raise SegXAIError(f"host not found: {host}; give a sample name ({', '.join(SAMPLE_HOSTS)}) or the path "
                          "of a T1 MRI scan")


def cmd_synth_lesion(args: argparse.Namespace) -> int:
    _check_host(args.host)
    _check_output_folder(args.out)
    from .data.lesion import synthesize_lesion, write_case
    from .data.samples import read_host
    from .fileio import OutputFolder

    fmt = args.format
    with OutputFolder(Path(args.out), inputs=[args.host], claims=(f"image.{fmt}", f"label.{fmt}")) as out:
        write_case(synthesize_lesion(read_host(args.host), seed=args.seed), out.staging, fmt=fmt)
    print(f"wrote {Path(args.out) / ('image.' + args.format)} and {Path(args.out) / ('label.' + args.format)}")
    return 0


def cmd_degrade(args: argparse.Namespace) -> int:
    _require(args.scan, "file")
    from .data.degrade import degrade
    from .volume import read_volume, write_volume

    scan_path, out = Path(args.scan), Path(args.out)
    if out.resolve() == scan_path.resolve():
        raise SegXAIError(f"--out {out} is the input scan; write the degraded copy to another file")
    write_volume(degrade(read_volume(scan_path), args.kind, args.strength, args.seed), out)
    print(f"wrote {out}")
    return 0


def cmd_ct_phantom(args: argparse.Namespace) -> int:
    _check_output_folder(args.out)
    from .data.ct_phantom import ct_phantom
    from .fileio import OutputFolder
    from .volume import write_volume

    fmt = args.format
    with OutputFolder(Path(args.out), claims=(f"image.{fmt}", f"label.{fmt}")) as out:
        image, label = ct_phantom(shape=tuple(args.shape), seed=args.seed)
        write_volume(image, out.path(f"image.{fmt}"))
        write_volume(label, out.path(f"label.{fmt}"))
    print(f"wrote a {'x'.join(map(str, args.shape[::-1]))} CT phantom to {args.out}")
    return 0


def cmd_synth_dataset(args: argparse.Namespace) -> int:
    hosts = args.hosts.split(",")
    for host in hosts:
        _check_host(host)
    _check_output_folder(args.out)
    from .training import synthesize_dataset

    first, last = args.seeds
    written = synthesize_dataset(hosts, range(first, last), Path(args.out), _progress(args), args.host_scale,
                                 args.host_blur, args.host_noise)
    print(f"wrote {len(written)} cases to {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    _require(args.config, "training configuration")
    from .training import TrainConfig, train

    config = TrainConfig.load(args.config)
    if args.iterations is not None:
        config.iterations = args.iterations
    if args.out is not None:
        config.out = args.out
    card_path = train(config, _progress(args), evaluate_only=args.evaluate_only)
    print(f"wrote model card {card_path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    _check_methods(args)
    _check_host(args.host)
    _check_output_folder(args.out)
    _check_model(args)
    from .demo import run_demo

    out = Path(args.out)
    demo = run_demo(out, args.host, args.seed, args.model, args.methods, args.device, _progress(args))
    summary = demo.summary
    print(f"demo: a synthetic brain tumour (seed {args.seed}) placed in the {demo.host} T1 MRI, "
          f"segmented by {demo.card.name} on {summary['device']}")
    for name, value in demo.dice.items():
        print(f"  Dice {name:20s} {value:.3f}")
    print(f"  explained '{summary['target']['name']}' with {len(summary['maps'])} maps from "
          f"{len(summary['explanations'])} methods ({', '.join(e['method'] for e in summary['explanations'])})")
    for key, value in summary["scores"].items():
        print(f"  {key:32s} {value:.4g}")
    print(f"scan:          {demo.image}\ntrue label:    {demo.label}\n"
          f"segmentation:  {out / summary['files']['segmentation']}\nsummary:       {out / 'summary.json'}\n"
          f"report:        {out / 'report.html'}")
    return 0


# ------------------------------------------------------------------- parser
def _shown(value: Any) -> str:
    """A default as it would be typed: ``None`` -> null, a tuple or list -> its items."""
    if value is None:
        return "null"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's layout (the list of methods) and appends each option's default to its help, where the
    help does not already say it; options off by default (flags) and those with no default say nothing more."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default in (None, False, [], argparse.SUPPRESS)
                or "default" in text):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})".strip()


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one ``error:`` line, and whose help may end with text made only when
    the help is shown (``epilog_of``: the methods, whose code imports torch)."""

    def __init__(self, *args: Any, epilog_of: Callable[[], str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self.epilog_of = epilog_of

    def format_help(self) -> str:
        if self.epilog_of is not None:
            self.epilog = self.epilog_of()
        return super().format_help()

    def error(self, message: str) -> None:
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def _methods_help(with_options: bool) -> Callable[[], str]:
    """The epilog of a command that takes ``--methods``: each method's name and summary and, ``with_options``,
    its options (``--option METHOD.NAME=VALUE``) with their defaults."""

    def text() -> str:
        from .methods import EXPLAINERS, explainer_class

        lines = ["methods (--methods takes their names, comma-separated, or 'all'):"]
        for name in EXPLAINERS:
            cls = explainer_class(name)
            lines += textwrap.wrap(cls.summary, 100, initial_indent=f"  {name:22s}", subsequent_indent=" " * 24,
                                   break_on_hyphens=False)
            if with_options:
                options = cls.Options
                pairs = [f"{public}={_shown(f.default)}" for public, f in zip(options.names(), fields(options))
                         if f.default is not MISSING]
                lines += textwrap.wrap(", ".join(pairs) if pairs else "none", 100,
                                       initial_indent=" " * 24 + "options: ", subsequent_indent=" " * 33,
                                       break_on_hyphens=False)
        if with_options:
            lines.append("Set an option with --option METHOD.NAME=VALUE, e.g. --option gradcam.layer=bottleneck.")
        return "\n".join(lines)

    return text


def _seed_range(text: str) -> tuple[int, int]:
    """``FIRST:STOP`` (stop excluded) or one seed ``N`` -> (first, stop)."""
    first, sep, stop = text.partition(":")
    try:
        bounds = (int(first), int(stop) if sep else int(first) + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be FIRST:STOP or one seed, e.g. 0:200, got {text!r}") from None
    if bounds[1] <= bounds[0]:
        raise argparse.ArgumentTypeError(f"FIRST:STOP needs STOP > FIRST, got {text!r}")
    return bounds


def _number_range(text: str) -> tuple[float, float]:
    """``LOW:HIGH`` -> (low, high)."""
    low, _, high = text.partition(":")
    try:
        return float(low), float(high)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be LOW:HIGH, e.g. 0.45:1.0, got {text!r}") from None


def _workers(text: str) -> int | str:
    """``auto`` or a number of worker processes (at least 1)."""
    if text == "auto":
        return text
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be a number of at least 1, or 'auto', got {text!r}")
    return count


def build_parser() -> argparse.ArgumentParser:
    from .data.degrade import DEFAULT_STRENGTH, DEGRADATIONS
    from .version import __version__

    parser = _Parser(prog="segxai", description="Segment 3D scans and explain the segmentation.")
    parser.add_argument("--version", action="version", version=f"segxai {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_progress(p: argparse.ArgumentParser) -> None:
        p.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                       help="progress as a bar on stderr, JSON lines on stdout (for the Slicer module), or none")

    def add_format(p: argparse.ArgumentParser) -> None:
        p.add_argument("--format", choices=FORMATS, default="nii.gz", help="file format of the written volumes")

    p = sub.add_parser("models", help="list the models available by name")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("segment", help="segment a scan")
    p.add_argument("scan", nargs="+", help=SCAN_HELP)
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument("--trust-model-code", action="store_true", help=TRUST_HELP)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    add_format(p)
    add_progress(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("explain", help="segment a scan and explain one class with several methods",
                       epilog_of=_methods_help(with_options=True))
    p.add_argument("scan", nargs="+", help=SCAN_HELP)
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument("--trust-model-code", action="store_true", help=TRUST_HELP)
    p.add_argument("--methods", default="gradcam", help="comma-separated methods (listed below), or 'all'")
    p.add_argument("--target", default=None, help="class or group name (default: the card's default target)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--label", default=None, help="ground-truth label file on the scan's grid (optional)")
    p.add_argument("--option", action="append", default=[], metavar="METHOD.NAME=VALUE",
                   help="method option, e.g. gradcam.layer=bottleneck (repeatable; options listed below)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    add_format(p)
    p.add_argument("--no-report", action="store_true", help="skip report.html and its pictures")
    add_progress(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("evaluate-maps", help="faithfulness of every map of an explain output folder "
                       "(Dice explained, perturbation ratio, deletion/insertion curves) -> faithfulness.csv")
    p.add_argument("folder", help="output folder of 'segxai explain' (with summary.json)")
    p.add_argument("--model", default=None, help="the explained model (default: the one named in summary.json)")
    p.add_argument("--trust-model-code", action="store_true", help=TRUST_HELP)
    p.add_argument("--steps", type=int, default=10, help="steps K of the deletion and insertion curves")
    p.add_argument("--baseline", default="0", help="value of removed voxels in normalised intensity, or 'min' "
                   "(the scan's minimum); use the baseline the maps were made with (MiSuRe's option)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    add_progress(p)
    p.set_defaults(func=cmd_evaluate_maps)

    def add_cohort(p: argparse.ArgumentParser) -> None:
        """Options shared by the commands that explain a folder of cases."""
        p.add_argument("cases", help="folder of case folders (image.<ext> [+ label.<ext>]) and/or scan files")
        p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
        p.add_argument("--trust-model-code", action="store_true", help=TRUST_HELP)
        p.add_argument("--methods", default="protoseg,misure,tta", help="comma-separated methods (listed below), "
                       "or 'all'")
        p.add_argument("--option", action="append", default=[], metavar="METHOD.NAME=VALUE",
                       help="method option, e.g. misure.steps=50 (repeatable; options listed below)")
        p.add_argument("--device", default="auto", help=DEVICE_HELP)
        where = p.add_mutually_exclusive_group()
        where.add_argument("--workers", default=None, metavar="N", type=_workers,
                           help="run cases on a local Dask cluster of N worker processes ('auto': one per GPU) "
                                "(default: one case after another in this process)")
        where.add_argument("--scheduler", default=None, metavar="ADDRESS",
                           help="run cases on an existing Dask cluster, e.g. tcp://host:8786 (optional)")
        add_progress(p)

    p = sub.add_parser("audit", help="explain every scan of a folder; audit.csv and audit.html list the cases "
                       "most in need of review first (resumable)", epilog_of=_methods_help(with_options=True))
    add_cohort(p)
    p.add_argument("--out", required=True, help="output folder (cases/<case>/, audit.csv, audit.html)")
    p.add_argument("--target", default=None, help="class or group name (default: the card's default target)")
    add_format(p)
    p.add_argument("--reports", action="store_true", help="also write each case's report.html (slower)")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("train-reliability", help="fit the reliability classifier (P(Dice >= 0.9) from the "
                       "explanation) on labelled cases; saved beside the model card",
                       epilog_of=_methods_help(with_options=True))
    add_cohort(p)
    p.add_argument("--out", default=None, help="reliability file (default: <card folder>/<card name>.reliability.json)")
    p.add_argument("--work", default=None,
                   help="keep the explained cases here (resumable; default: a temporary folder)")
    p.set_defaults(func=cmd_train_reliability)

    p = sub.add_parser("demo", help="place a lesion in a packaged brain MRI, segment it, print Dice",
                       epilog_of=_methods_help(with_options=False))
    p.add_argument("--out", default="segxai-demo", help="output folder")
    p.add_argument("--host", default=None, help="mni152, colin27 or a T1 MRI path (default: colin27 when "
                   "installed, else mni152)")
    p.add_argument("--seed", type=int, default=20001, help="lesion seed (training used 0-9999)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument("--methods", default="all", help="comma-separated methods (listed below); 'all': every method "
                   "that applies to the model")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    add_progress(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("synth-lesion", help="place a synthetic brain tumour in a T1 MRI")
    p.add_argument("host", help="T1 MRI path, or a sample name: mni152, colin27")
    p.add_argument("--seed", type=int, required=True, help="lesion seed: the same seed draws the same lesion")
    p.add_argument("--out", required=True, help="output folder (image.<format>, label.<format>)")
    add_format(p)
    p.set_defaults(func=cmd_synth_lesion)

    p = sub.add_parser("synth-dataset", help="many lesion cases for training (one folder per case)")
    p.add_argument("--hosts", default="colin27,colin27-brain,mni152", help="comma-separated sample names or T1 "
                   "MRI paths")
    p.add_argument("--seeds", required=True, type=_seed_range, help="FIRST:STOP (stop excluded), e.g. 0:200")
    p.add_argument("--host-scale", default=None, metavar="LOW:HIGH", type=_number_range,
                   help="shrink/grow each host by a seeded factor in this range, e.g. 0.45:1.0 (default: no scaling)")
    p.add_argument("--host-blur", type=float, default=None, metavar="MM",
                   help="blur each host before the lesion is drawn, by a seeded FWHM between 0 and this, e.g. 7 "
                        "(default: no blur)")
    p.add_argument("--host-noise", type=float, default=None, metavar="STD",
                   help="add Rician noise to each host before the lesion is drawn, of a seeded std between 0 and "
                        "this fraction of the tissue level, e.g. 0.08 (default: no noise)")
    p.add_argument("--out", required=True, help="output folder (one folder per case)")
    add_progress(p)
    p.set_defaults(func=cmd_synth_dataset)

    p = sub.add_parser("degrade", help="a degraded copy of a scan (noise, blur, bias field, contrast) on its grid, "
                                       "to test that audits flag the cases a model should not be trusted on")
    p.add_argument("scan", help="NIfTI/NRRD/MHA file or DICOM series folder")
    p.add_argument("--kind", required=True, choices=DEGRADATIONS, help="what to degrade")
    p.add_argument("--strength", type=float, default=None,
                   help="noise: std / tissue level; blur: FWHM in mm; bias: log-field half-range; gamma: exponent "
                        f"(defaults: {', '.join(f'{k} {v:g}' for k, v in DEFAULT_STRENGTH.items())})")
    p.add_argument("--seed", type=int, default=0, help="seed of the random noise or bias field")
    p.add_argument("--out", required=True, help="the degraded scan's file (.nii.gz, .nrrd, .mha ...)")
    p.set_defaults(func=cmd_degrade)

    p = sub.add_parser("ct-phantom", help="write a synthetic CT in Hounsfield units with organ/lesion labels")
    p.add_argument("--out", required=True, help="output folder (image.<format>, label.<format>)")
    p.add_argument("--shape", type=int, nargs=3, default=[64, 128, 128], metavar=("K", "J", "I"),
                   help="voxels along each axis")
    p.add_argument("--seed", type=int, default=0, help="seed of the random organs and lesions")
    add_format(p)
    p.set_defaults(func=cmd_ct_phantom)

    p = sub.add_parser("train", help="train a model from image/label pairs and write its card")
    p.add_argument("--config", required=True, help="training configuration JSON (see Resources/Training)")
    p.add_argument("--iterations", type=int, default=None, help="override the configured iterations (optional)")
    p.add_argument("--out", default=None, help="override the configured card path (optional)")
    p.add_argument("--evaluate-only", action="store_true",
                   help="train nothing: evaluate the weights the configuration names and write the card")
    add_progress(p)
    p.set_defaults(func=cmd_train)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt for SIGINT, so that it unwinds through every
    ``with OutputFolder`` block (which removes its staging folder) and is not caught by ``except Exception``."""


def _on_signal(signum: int, frame) -> None:
    for number in (signal.SIGINT, signal.SIGTERM):  # the first signal wins; the cleanup is short
        signal.signal(number, signal.SIG_IGN)
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Exit codes: 0 done, 2 a user error (one ``error:`` line), 130 cancelled or interrupted
    (SIGINT, Ctrl-C), 143 terminated (SIGTERM); an interrupted command leaves no partial output."""
    handlers = {}
    if threading.current_thread() is threading.main_thread():  # a signal ignored by the parent stays ignored
        handlers = {number: signal.signal(number, _on_signal) for number in (signal.SIGINT, signal.SIGTERM)
                    if signal.getsignal(number) is not signal.SIG_IGN}
    try:  # parsing too: --help of a command with methods imports them, which takes seconds
        args = build_parser().parse_args(argv)
        return args.func(args)
    except KeyboardInterrupt:
        print("error: interrupted (SIGINT, Ctrl-C); no partial output was left", file=sys.stderr)
        return 130
    except Terminated:
        print("error: terminated (SIGTERM); no partial output was left", file=sys.stderr)
        return 143
    except Cancelled as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 130
    except SegXAIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        for number, handler in handlers.items():
            if handler is not None:
                signal.signal(number, handler)


if __name__ == "__main__":
    sys.exit(main())
