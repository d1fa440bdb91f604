"""The panel's Reload reads the logic's files again (SegXAI.py's onReload forgets SegXAILogic and SegXAILib)."""

from __future__ import annotations

import importlib
import sys

import pytest

pytest.importorskip("slicer")  # SegXAILogic's package imports slicer


def test_forgotten_packages_are_read_again_on_the_next_import(tmp_path, monkeypatch):
    import SegXAILogic.logic
    from SegXAILogic.reload import RELOADED_PACKAGES, forgetModules

    old_logic = SegXAILogic.logic
    saved = {name: module for name, module in sys.modules.items() if name.startswith(RELOADED_PACKAGES)}
    # a package of the same shape whose file we edit between two imports
    package = tmp_path / "EditedLogic"
    package.mkdir()
    (package / "__init__.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert importlib.import_module("EditedLogic").VALUE == 1
    (package / "__init__.py").write_text("VALUE = 22\n")  # another size: no stale bytecode
    try:
        dropped = forgetModules((*RELOADED_PACKAGES, "EditedLogic"))
        assert {"SegXAILogic", "SegXAILogic.logic", "SegXAILib", "EditedLogic"} <= set(dropped)
        assert not any(name.startswith((*RELOADED_PACKAGES, "EditedLogic")) for name in sys.modules)
        importlib.invalidate_caches()
        assert importlib.import_module("EditedLogic").VALUE == 22
        assert importlib.import_module("SegXAILogic.logic") is not old_logic
    finally:
        forgetModules((*RELOADED_PACKAGES, "EditedLogic"))
        sys.modules.update(saved)  # the other tests keep the module objects they imported


def test_the_panel_reloads_through_forget_modules():
    from pathlib import Path

    source = (Path(__file__).resolve().parent.parent / "SegXAI" / "SegXAI.py").read_text(encoding="utf-8")
    method = source[source.index("    def onReload(self)"):source.index("    def cleanup(self)")]
    assert "forgetModules()" in method and "ScriptedLoadableModuleWidget.onReload(self)" in method
