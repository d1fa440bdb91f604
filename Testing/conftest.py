"""Tests of the Slicer module's Qt-free logic, run outside Slicer with slicer-core.

The module folder SegXAI/ is put on sys.path as Slicer does for a scripted module, so that
``import SegXAILogic`` finds the package beside SegXAI.py (SegXAI.py itself needs Qt and is not
imported here).
"""

from __future__ import annotations

import sys
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parent.parent / "SegXAI"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))
