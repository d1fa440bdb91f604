"""The explanation report of an output folder: PNG montages and one self-contained HTML page.

``write_report(folder)`` reads ``folder/summary.json`` (written by ``segxai explain``), the files it
names and the scan, and writes ``folder/report.html`` and the pictures under ``folder/report/``.
"""

from .html import write_report
from .montage import object_center, orthogonal_slices

__all__ = ["object_center", "orthogonal_slices", "write_report"]
