"""Draw the SegXAI panel's layout (docs/slicer/panel.png) from the module's own .ui file.

Every section, label and control is read from SegXAI/Resources/UI/SegXAI.ui in order, so the picture
follows the panel when the .ui changes; the method check boxes and their help lines come from the
method registry, as the panel fills them. Example values (a volume name, scores) are made up.

    python docs/slicer/draw_panel.py [--out docs/slicer/panel.png]
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch, Rectangle  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "SegXAI"))
UI_FILE = ROOT / "SegXAI" / "Resources" / "UI" / "SegXAI.ui"

EXAMPLES = {  # what the controls would show on a typical case
    "inputSelector": "case 3 (T1)",
    "modelComboBox": "brain-lesion-unet",
    "deviceComboBox": "auto",
    "targetComboBox": "default (whole tumour)",
    "layerComboBox": "case 3: gradcam (whole tumour)",
    "layerDescriptionLabel": "Grad-CAM at last_decoder: where the layer's features raise the whole tumour logits",
    "scoresLabel": "Volume of whole tumour: 41.20 mL\nMean segmentation ability (protoseg): 0.44 (poor)\n"
                   "Uncertainty inside whole tumour (tta entropy): 12% of the maximum",
    "reviewLabel": "Review this case: the network's features barely separate the object (mean SA 0.44).",
    "statusLabel": "gradcam: window 3/8",
}
SLIDERS = {"opacitySliderWidget": 0.5, "thresholdSliderWidget": 0.2}
WIDTH, ROW = 10.0, 0.42  # drawing units: panel width, height of one control row
GREY, DARK, BLUE = "#e9e9e9", "#444444", "#3d7ab8"
CHARS_PER_UNIT = 7.4  # characters of 8.5 pt text per drawing unit, for wrapping labels


class Canvas:
    """Draws rows top to bottom; ``y`` is the top of the next row."""

    def __init__(self, ax) -> None:
        self.ax, self.y = ax, 0.0

    def text(self, x, y, s, **kw):
        self.ax.text(x, y, s, va="center", fontsize=kw.pop("size", 8.5), color=kw.pop("color", DARK), **kw)

    def box(self, x, y, w, h, face="white", edge="#9a9a9a", rounded=False):
        cls = FancyBboxPatch if rounded else Rectangle
        extra = {"boxstyle": "round,pad=0,rounding_size=0.08"} if rounded else {}
        self.ax.add_patch(cls((x, y - h), w, h, facecolor=face, edgecolor=edge, lw=0.8, **extra))

    def header(self, title: str, collapsed: bool = False):
        self.box(0, self.y, WIDTH, ROW, face="#d6d6d6")
        self.text(0.15, self.y - ROW / 2, ("\u25b8 " if collapsed else "\u25be ") + title, weight="bold")
        self.y -= ROW + 0.08

    def control(self, widget: ET.Element, x: float, w: float):
        cls, name = widget.get("class"), widget.get("name")
        y, mid = self.y, self.y - ROW / 2
        if cls in ("QComboBox", "qMRMLNodeComboBox"):
            self.box(x, y - 0.04, w, ROW - 0.08, rounded=True)
            self.text(x + 0.1, mid, EXAMPLES.get(name, ""))
            self.text(x + w - 0.25, mid, "\u25be")
        elif cls == "ctkSliderWidget":
            value = SLIDERS.get(name, 0.5)
            self.ax.plot([x + 0.1, x + w - 1.0], [mid, mid], color="#9a9a9a", lw=2)
            self.ax.plot([x + 0.1 + value * (w - 1.1)], [mid], "o", color=BLUE, ms=6)
            self.box(x + w - 0.85, y - 0.04, 0.85, ROW - 0.08)
            self.text(x + w - 0.75, mid, f"{value:.2f}")
        elif cls == "ctkRangeWidget":
            self.box(x, y - 0.04, 0.8, ROW - 0.08)
            self.text(x + 0.1, mid, "0.00")
            self.ax.plot([x + 0.9, x + w - 0.9], [mid, mid], color=BLUE, lw=3)
            self.box(x + w - 0.8, y - 0.04, 0.8, ROW - 0.08)
            self.text(x + w - 0.7, mid, "1.00")
        elif cls == "QPushButton":
            self.box(x, y - 0.03, w, ROW - 0.06, face=GREY, rounded=True)
            self.text(x + w / 2, mid, property_text(widget), ha="center")
        elif cls == "QCheckBox":
            self.box(x, mid + 0.09, 0.18, 0.18)
            self.text(x + 0.3, mid, property_text(widget))
        elif cls == "QProgressBar":
            self.box(x, y - 0.06, w, ROW - 0.12)
            self.box(x, y - 0.06, w * 0.45, ROW - 0.12, face=BLUE, edge=BLUE)
        elif cls == "QLabel":
            text = EXAMPLES.get(name) or property_text(widget)
            chars = int(w * CHARS_PER_UNIT * (0.85 if name == "reviewLabel" else 1.0))  # bold is wider
            lines = [line for part in text.split("\n") for line in textwrap.wrap(part, chars)]
            color = "#c0392b" if name == "reviewLabel" else DARK
            for n, line in enumerate(lines):
                self.text(x, mid - n * ROW * 0.8, line, color=color, weight="bold" if name == "reviewLabel" else None)
            self.y -= ROW * 0.8 * (len(lines) - 1)

    def methods(self, x: float):
        from SegXAILogic import availableMethods

        for n, (name, summary) in enumerate(availableMethods().items()):
            mid = self.y - ROW / 2
            self.box(x, mid + 0.09, 0.18, 0.18, face=BLUE if n == 0 else "white")
            self.text(x + 0.3, mid, name, weight="bold")
            self.text(x + 0.3, mid - ROW * 0.55, shorten(summary, int((WIDTH - x - 0.5) * CHARS_PER_UNIT * 1.1)),
                      size=7, color="#777777")
            self.y -= ROW * 1.35


def property_text(widget: ET.Element) -> str:
    for prop in widget.findall("property"):
        if prop.get("name") == "text":
            return prop.findtext("string") or ""
    return ""


def shorten(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def draw_layout(canvas: Canvas, layout: ET.Element) -> None:
    kind = layout.get("class")
    if kind == "QFormLayout":
        rows: dict[int, list] = {}
        for item in layout.findall("item"):
            rows.setdefault(int(item.get("row")), []).append(item)
        for row in sorted(rows):
            items = sorted(rows[row], key=lambda i: int(i.get("column")))
            if len(items) == 2:
                canvas.text(0.3, canvas.y - ROW / 2, property_text(items[0].find("widget")))
                field = items[1].find("widget")
                if field.get("name") == "methodsFrame":
                    canvas.methods(3.2)
                    continue
                canvas.control(field, 3.2, WIDTH - 3.4)
            elif items[0].find("layout") is not None:  # a row of buttons
                buttons = [i.find("widget") for i in items[0].find("layout").findall("item")]
                width = (WIDTH - 0.4 - 0.15 * (len(buttons) - 1)) / len(buttons)
                for n, button in enumerate(buttons):
                    canvas.control(button, 0.2 + n * (width + 0.15), width)
            else:
                canvas.control(items[0].find("widget"), 0.3, WIDTH - 0.5)
            canvas.y -= ROW + 0.06
    else:  # vertical box
        for item in layout.findall("item"):
            widget = item.find("widget")
            if widget is None:
                continue
            if widget.get("class") == "ctkCollapsibleButton":
                collapsed = any(p.get("name") == "collapsed" for p in widget.findall("property"))
                canvas.header(property_text(widget), collapsed)
                if not collapsed:
                    draw_layout(canvas, widget.find("layout"))
                canvas.y -= 0.12
            else:
                canvas.control(widget, 0.2, WIDTH - 0.4)
                canvas.y -= ROW + 0.06


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "panel.png"))
    args = parser.parse_args(argv)
    root = ET.parse(UI_FILE).getroot().find("widget")

    def render(ax) -> float:
        canvas = Canvas(ax)
        canvas.text(0, 0.35, "SegXAI", size=12, weight="bold")
        draw_layout(canvas, root.find("layout"))
        return canvas.y

    height = -render(plt.figure().add_subplot()) + 0.8  # a dry run measures the height
    plt.close("all")
    fig = plt.figure(figsize=(WIDTH * 0.48, height * 0.48), dpi=150)
    ax = fig.add_axes([0, 0, 1, 1])
    render(ax)
    ax.set_xlim(-0.2, WIDTH + 0.2)
    ax.set_ylim(-height + 0.6, 0.8)
    ax.axis("off")
    fig.savefig(args.out, facecolor="white")
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
