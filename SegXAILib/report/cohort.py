"""The cohort page of ``segxai audit``: one self-contained HTML table of cases, most in need of review first.

It shows what ``audit.csv`` holds, one thumbnail per case (:func:`~SegXAILib.report.montage.render_thumbnail`)
and, when labels exist, how well each score predicts Dice. Pictures are embedded as data URIs and the
CSS is the explanation report's, so the page can be mailed or archived on its own.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_text
from .html import _CSS, _data_uri, _table

TEXT_COLUMNS = ("case", "status", "review_needed", "review_reasons", "target", "error")
"""Columns of ``audit.csv`` that are not numbers (the others are right-aligned)."""


@dataclass(frozen=True)
class CohortCase:
    """One case of the page.

    Attributes:
        cells: its ``audit.csv`` row, column -> text.
        thumbnail: its thumbnail PNG, ``None`` when it has none (a failed case).
        link: a link relative to the page (its report, summary or error file), or ``None``.
    """

    cells: Mapping[str, str]
    thumbnail: Path | None
    link: str | None


def write_cohort_page(path: Path, facts: Mapping[str, str], cases: Sequence[CohortCase],
                      prediction: Sequence[Mapping[str, Any]], order_note: str) -> Path:
    """Write the page to ``path`` (atomically) and return it.

    Args:
        facts: heading facts (model, methods, counts), shown as written.
        cases: the cases in the order to show.
        prediction: rows of :func:`SegXAILib.audit.score_vs_dice` (empty: no labels, no section).
        order_note: how the cases are ordered, in words.
    """
    facts = {**facts, "Date": datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")}
    header = ("<header><h1>SegXAI cohort audit</h1>\n<dl>"
              + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in facts.items())
              + "</dl></header>")
    sections = [header, _cases(cases, order_note), _prediction(prediction)]
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<title>SegXAI cohort audit</title>\n"
            f"<style>{_CSS}{_EXTRA_CSS}</style>\n</head>\n<body>\n" + "\n".join(s for s in sections if s)
            + "\n<footer>Made by SegXAI 'audit' from the summary.json of every case.</footer>\n</body>\n</html>\n")
    return atomic_write_text(Path(path), page)


def _cases(cases: Sequence[CohortCase], order_note: str) -> str:
    if not cases:
        return ""
    columns = [c for c in cases[0].cells if c not in ("case", "review_needed", "review_reasons", "status")]
    headers = ["Axial slice", "Case", "Review", *columns]
    rows = []
    for case in cases:
        cells = case.cells
        name = html.escape(cells["case"])
        picture = (f"<img class=\"thumb\" alt=\"axial slice of {name}\" src=\"{_data_uri(case.thumbnail)}\">"
                   if case.thumbnail is not None else "")
        if case.link:
            name = f"<a href=\"{html.escape(case.link)}\">{name}</a>"
        if cells["status"] != "ok":
            verdict = "<span class=\"flag\">failed</span>"
        elif cells["review_needed"] == "yes":
            verdict = ("<span class=\"flag\">review</span><br>"
                       + "<br>".join(html.escape(r) for r in cells["review_reasons"].split("; ") if r))
        else:
            verdict = "no score past its threshold"
        rows.append([picture, name, verdict, *(html.escape(cells[c]) for c in columns)])
    numeric = [n + 3 for n, c in enumerate(columns) if c not in TEXT_COLUMNS]
    return (f"<section><h2>Cases</h2>\n<p>{html.escape(order_note)} The outline (cyan) is the model's segmentation "
            "of the target on the axial slice through its centre.</p>\n" + _table(headers, rows, numeric)
            + "</section>")


def _prediction(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return ""
    threshold = f"{float(rows[0]['dice_below']):g}"
    body = [[f"<code>{html.escape(str(r['score']))}</code>", str(r["cases"]), _number(r["spearman_rho"]),
             _number(r["spearman_p"]), _number(r["auroc"]), html.escape(str(r["poor_when"])),
             html.escape(str(r["note"]))] for r in rows]
    return ("<section><h2>How well each score predicts Dice</h2>\n"
            f"<p>Over the cases with a label. Spearman's rho: rank correlation of the score with the Dice of the "
            f"target (ProtoSeg's paper compares mean SA \u03bc with Dice this way). AUROC: how well the score "
            f"tells the "
            f"cases with Dice &lt; {html.escape(threshold)} from the others (MiSuRe's paper reports its reliability "
            f"classifier's AUC), 0.5 = no better than chance, 1 = perfectly; a score counts as predicting a poor "
            f"Dice on the side its review rule flags.</p>\n"
            + _table(["Score", "Cases", "Spearman rho", "p", f"AUROC (Dice < {threshold})", "Poor Dice when",
                      "Note"], body, (1, 2, 3, 4)) + "</section>")


def _number(value: Any) -> str:
    return "NaN" if value is None or not math.isfinite(value) else f"{value:.3g}"


_EXTRA_CSS = "img.thumb{width:120px;height:auto;display:block}"
