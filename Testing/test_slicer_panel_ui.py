"""The panel's .ui file against the code that uses it (SegXAI.py needs Qt, so both are read as text).

A widget name used in SegXAI.py but missing from the .ui fails only when a user clicks in Slicer;
a SlicerParameterName naming no parameter, or a widget that cannot show its parameter's type,
fails when the panel opens. These tests catch both here.
"""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parent.parent / "SegXAI"
CODE = (MODULE_DIR / "SegXAI.py").read_text(encoding="utf-8")
UI = ET.parse(MODULE_DIR / "Resources" / "UI" / "SegXAI.ui").getroot()

QT_WIDGETS = {"QLabel", "QComboBox", "QPushButton", "QCheckBox", "QFrame", "QProgressBar", "QPlainTextEdit"}
# Which widget classes Slicer's parameterNodeWrapper connects to which annotation (guiConnectors.py).
CONNECTABLE = {"qMRMLNodeComboBox": r"vtkMRML\w+Node", "QComboBox": r"Annotated\[str, Choice\(",
               "ctkSliderWidget": r"Annotated\[float, WithinRange\(", "QCheckBox": r"bool"}


def ui_widgets() -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in UI.iter("widget")}


def parameter_fields() -> dict[str, str]:
    """Field name -> annotation text of the @parameterNodeWrapper class in SegXAI.py."""
    tree = ast.parse(CODE)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SegXAIParameterNode")
    assert any(ast.unparse(d) == "parameterNodeWrapper" for d in cls.decorator_list)
    return {n.target.id: ast.unparse(n.annotation) for n in cls.body if isinstance(n, ast.AnnAssign)}


def test_every_widget_the_code_uses_exists_in_the_ui():
    used = set(re.findall(r"self\.ui\.(\w+)", CODE))
    assert {"applyButton", "layerComboBox", "progressBar", "logTextEdit", "exportDicomSegButton"} <= used
    missing = used - set(ui_widgets())
    assert not missing, f"SegXAI.py uses widgets the .ui lacks: {sorted(missing)}"


def test_the_ui_has_the_panel_the_issue_asks_for():
    widgets = ui_widgets()
    for name, cls in {"inputSelector": "qMRMLNodeComboBox", "modelComboBox": "QComboBox", "deviceComboBox": "QComboBox",
                      "targetComboBox": "QComboBox", "methodsFrame": "QFrame", "applyButton": "QPushButton",
                      "progressBar": "QProgressBar", "logTextEdit": "QPlainTextEdit", "layerComboBox": "QComboBox",
                      "opacitySliderWidget": "ctkSliderWidget", "thresholdSliderWidget": "ctkSliderWidget",
                      "colorRangeWidget": "ctkRangeWidget", "scoresLabel": "QLabel", "reviewLabel": "QLabel",
                      "exportLabelmapButton": "QPushButton", "exportDicomSegButton": "QPushButton",
                      "saveSceneButton": "QPushButton"}.items():
        assert widgets.get(name) == cls, name
    custom = {c.findtext("class") for c in UI.iter("customwidget")}
    assert set(widgets.values()) - QT_WIDGETS <= custom  # every non-Qt class is declared for the loader


def test_bound_widgets_name_parameters_of_a_type_they_can_show():
    fields = parameter_fields()
    widgets = ui_widgets()
    bound = {w.get("name"): p.findtext("string") for w in UI.iter("widget")
             for p in w.findall("property") if p.get("name") == "SlicerParameterName"}
    assert bound == {"inputSelector": "inputVolume", "deviceComboBox": "device", "opacitySliderWidget": "opacity"}
    for widget, parameter in bound.items():
        assert parameter in fields, f"{widget} is bound to {parameter!r}, which the parameter node lacks"
        assert re.match(CONNECTABLE[widgets[widget]], fields[parameter]), (widget, fields[parameter])
