"""The extension's CMake files: configured without Slicer they stage the module as an installed extension lays
it out, and the staged copy of SegXAILib is the one that imports and runs from there."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULE_DIR = ROOT / "SegXAI"


def expected_files() -> set[str]:
    module = {"SegXAI.py", "Resources/Icons/SegXAI.png", "Resources/UI/SegXAI.ui", "Resources/requirements.txt"}
    module |= {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "SegXAILogic").glob("*.py")}
    engine = ROOT / "SegXAILib"
    module |= {p.relative_to(ROOT).as_posix() for p in engine.rglob("*.py")
               if "tests" not in p.relative_to(engine).parts}
    module |= {p.relative_to(ROOT).as_posix() for pattern in ("*.json", "*.safetensors", "*.pth")
               for p in (engine / "models" / "weights").rglob(pattern)}  # an nnU-Net model is a folder
    return module


def test_cmake_lists_every_module_file_and_the_extension_fields():
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\s+(SegXAILogic/\w+\.py)$", cmake, re.M))
    assert listed == {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "SegXAILogic").glob("*.py")}
    top = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in top and 'set(EXTENSION_DEPENDS "PyTorch")' in top
    for field in ("HOMEPAGE", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert re.search(rf'set\(EXTENSION_{field} "[^"]+"\)', top), field
    assert "slicerMacroBuildScriptedModule(" in (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
@pytest.mark.slow
def test_configure_without_slicer_stages_the_installed_layout(tmp_path):
    build = tmp_path / "build"
    configure = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build)], capture_output=True, text=True)
    assert configure.returncode == 0, configure.stderr
    assert "Slicer was not found" in configure.stderr  # says how to build the real package
    stage = build / "qt-scripted-modules"
    staged = {p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file()}
    assert staged == expected_files()
    assert (stage / "SegXAILib" / "cli.py").read_bytes() == (ROOT / "SegXAILib" / "cli.py").read_bytes()

    install = subprocess.run(["cmake", "--install", str(build), "--prefix", str(tmp_path / "prefix")],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    installed = tmp_path / "prefix" / "lib" / "SegXAI" / "qt-scripted-modules"
    assert {p.relative_to(installed).as_posix() for p in installed.rglob("*") if p.is_file()} == staged

    # The packaged engine is the one found first from the module folder, and its command line runs.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(installed)}
    probe = subprocess.run([sys.executable, "-c", "import SegXAILib; print(SegXAILib.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    assert Path(probe.stdout.strip()).is_relative_to(installed)
    cli = subprocess.run([sys.executable, "-m", "SegXAILib.cli", "explain", "--help"], capture_output=True, text=True,
                         env=env, cwd=tmp_path)
    assert cli.returncode == 0 and "--progress" in cli.stdout
