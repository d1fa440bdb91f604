"""SegXAI: explainable 3D segmentation in 3D Slicer.

The panel only connects widgets: the work is done by ``segxai explain`` in a child process, and the
MRML side (running it, loading its output as nodes, layers, exports) lives in the Qt-free SegXAILogic
package beside this file, which the tests use with slicer-core.
"""

import html
import logging
import os
import tempfile
import time
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from SegXAILogic import (
    ExplainLogic,
    availableMethods,
    availableModels,
    modelDescription,
    modelSequences,
    modelsInFolder,
    modelTargets,
    modelTrustQuestion,
    updateNodeFromVolume,
    volumeFromNode,
)
from SegXAILogic.exports import cameFromDicom, exportDicomSeg, exportSegmentationToFile, saveSceneBundle
from SegXAILogic.requirements import SLICER_PROVIDED, TORCH_REQUIREMENT, missingRequirements, readRequirements
from SegXAILogic.results import mapThreshold, mapWindow, setMapThreshold, setMapWindow, showMap, shownMap
from SegXAILogic.scores import caseScores, reviewVerdict, sequenceShares

DEFAULT_MODEL = "brain-lesion-unet"
VERDICT_STYLES = {"review": "color: #c0392b; font-weight: bold", "incomplete": "color: #b9770e", "ok": ""}
"""How the verdict label looks: red when a score asks for review, amber when checks were not run."""
ADD_CARD, ADD_BUNDLE = "Add model card...", "Add model folder (MONAI bundle or nnU-Net)..."

#
# SegXAI
#


class SegXAI(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SegXAI"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["SegXAI founding engineers"]
        self.parent.helpText = """
SegXAI segments a 3D scan and explains the result: which voxels drove the segmentation, how sure the
model is, and whether the case needs review. Each explanation is a volume you can show over the slices.
<p>Pick the input volume, a model, the class to explain and one or more methods, then Apply. The first
time, SegXAI asks to install PyTorch (through the PyTorch extension) and its other Python packages.</p>
See the <a href="https://github.com/segxai/SegXAI">project page</a>.
"""
        self.parent.acknowledgementText = """
Built on 3D Slicer's scripted module template (Jean-Christophe Fillion-Robin, Kitware Inc.;
Andras Lasso, PerkLab; Steve Pieper, Isomics, Inc.).
"""


#
# SegXAIParameterNode
#


@parameterNodeWrapper
class SegXAIParameterNode:
    """The panel's state, saved with the scene.

    inputVolume - the scan to segment and explain.
    model - a model name from ``segxai models``, a model card path or a MONAI bundle folder.
    device - where the network runs: auto (GPU when there is one), GPU or CPU.
    targetClass - the class or group to explain; empty: the model card's default.
    methods - comma-separated explanation methods.
    opacity - opacity of the explanation layer shown over the slices.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    model: str = DEFAULT_MODEL
    device: Annotated[str, Choice(["auto", "GPU", "CPU"])] = "auto"
    targetClass: str = ""
    methods: str = "gradcam"
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5


#
# SegXAIWidget
#


class SegXAIWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: loads Resources/UI/SegXAI.ui, binds it to the parameter node, calls the logic."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._methodCheckBoxes = {}
        self._catalogueLoaded = False
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.timeout.connect(self.onTimer)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SegXAI.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        # The .ui connects the top-level widget's mrmlSceneChanged signal to each MRML widget.
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SegXAILogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)

        self.ui.applyButton.clicked.connect(self.onApplyButton)
        self.ui.modelComboBox.activated.connect(self.onModelActivated)
        self.ui.targetComboBox.currentIndexChanged.connect(self.onTargetChanged)
        self.ui.inputSelector.currentNodeChanged.connect(self.updateResults)
        self._sequenceSelectors: list = []  # a model of several sequences: one more input per sequence after the first
        self.ui.layerComboBox.currentIndexChanged.connect(self.onLayerChanged)
        self.ui.opacitySliderWidget.valueChanged.connect(self.onOpacityChanged)
        self.ui.thresholdSliderWidget.valueChanged.connect(self.onThresholdChanged)
        self.ui.colorRangeWidget.valuesChanged.connect(self.onColorRangeChanged)
        self.ui.colorLegendCheckBox.toggled.connect(self.onColorLegendToggled)
        self.ui.exportLabelmapButton.clicked.connect(self.onExportLabelmap)
        self.ui.exportDicomSegButton.clicked.connect(self.onExportDicomSeg)
        self.ui.saveSceneButton.clicked.connect(self.onSaveScene)

        self.initializeParameterNode()
        self.loadCatalogue()
        self.updateResults()

    def onReload(self) -> None:
        """Reload SegXAILogic and SegXAILib with this file, so that an edit of the logic needs no restart."""
        from SegXAILogic.reload import forgetModules

        forgetModules()
        ScriptedLoadableModuleWidget.onReload(self)

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self._timer.stop()
        self.logic.cancel()
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()
        self.updateResults()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateApplyButton)

    def onSceneStartClose(self, caller, event) -> None:
        self.logic.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onSceneEndImport(self, caller, event) -> None:
        self.updateResults()  # a loaded .mrb brings its results back

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateApplyButton)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Binds the widgets with a SlicerParameterName property: inputSelector, deviceComboBox,
            # opacitySliderWidget. Model, target and methods are filled from the catalogue, below.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateApplyButton)
            self.updateApplyButton()

    # ---------------------------------------------------------- catalogue
    def loadCatalogue(self) -> None:
        """Fill models and methods; without SegXAI's Python packages, Apply offers to install them."""
        if self._catalogueLoaded or dependenciesMissing():
            self.updateApplyButton()
            return

        self.ui.modelComboBox.clear()
        for name, path in availableModels().items():
            self.ui.modelComboBox.addItem(name, name)
            self.ui.modelComboBox.setItemData(self.ui.modelComboBox.count - 1, str(path), qt.Qt.ToolTipRole)
        self.ui.modelComboBox.addItem(ADD_CARD)
        self.ui.modelComboBox.addItem(ADD_BUNDLE)

        layout = self.ui.methodsFrame.layout()
        chosen = set(self._parameterNode.methods.split(",")) if self._parameterNode else {"gradcam"}
        for name, summary in availableMethods().items():
            checkBox = qt.QCheckBox(name)
            checkBox.checked = name in chosen
            checkBox.toggled.connect(self.onMethodsChanged)
            helpLabel = qt.QLabel(summary)
            helpLabel.wordWrap = True
            helpLabel.setStyleSheet("color: palette(mid); margin-left: 20px")
            layout.addWidget(checkBox)
            layout.addWidget(helpLabel)
            self._methodCheckBoxes[name] = checkBox
        self._catalogueLoaded = True
        self.selectModel(self._parameterNode.model if self._parameterNode else DEFAULT_MODEL)

    def addModelItem(self, model: str, label: str = "") -> None:
        """List ``model`` (a path) in the combo box, above the "Add..." items, unless it is there already."""
        if self.ui.modelComboBox.findData(model) < 0:
            self.ui.modelComboBox.insertItem(self.ui.modelComboBox.count - 2, label or os.path.basename(model), model)

    def addModelFolder(self, folder: str) -> str:
        """List every model ``folder`` is or holds (``modelsInFolder``); the first one's path, "" when none."""
        models = modelsInFolder(folder)
        if not models:
            slicer.util.warningDisplay(f"No model found in {folder}. Choose a MONAI bundle folder, an nnU-Net "
                                       "trained-model folder, or a folder holding nnU-Net models (such as a "
                                       "TotalSegmentator or nnU-Net results folder).")
            return ""
        for name, path in models.items():
            self.addModelItem(path, name)
        if len(models) > 1:
            self.log(f"Added {len(models)} models from {folder}: {', '.join(models)}")
        return next(iter(models.values()))

    def selectModel(self, model: str) -> None:
        """Show ``model`` in the combo box and its classes in the target combo box."""
        self.addModelItem(model)
        self.ui.modelComboBox.currentIndex = self.ui.modelComboBox.findData(model)
        self._parameterNode.model = model
        wasBlocked = self.ui.targetComboBox.blockSignals(True)
        self.ui.targetComboBox.clear()
        try:
            default, targets = modelTargets(model)
            self.ui.modelDescriptionLabel.text = modelDescription(model)
        except Exception as exc:  # a card that does not load: say why instead of failing the panel
            self.log(f"Model {model}: {exc}")
            default, targets = None, []
            self.ui.modelDescriptionLabel.text = ""
        self.ui.targetComboBox.addItem(f"default ({default})" if default else "default", "")
        for target in targets:
            self.ui.targetComboBox.addItem(target, target)
        self.ui.targetComboBox.currentIndex = max(0, self.ui.targetComboBox.findData(self._parameterNode.targetClass))
        self.ui.targetComboBox.blockSignals(wasBlocked)
        self.showSequenceInputs(model)

    def showSequenceInputs(self, model: str) -> None:
        """One input selector per sequence the model takes, labelled with its name (the first is the panel's own
        input selector, whose node the results belong to)."""
        try:
            names = modelSequences(model)
        except Exception:  # noqa: BLE001 - selectModel has said why the card does not load
            names = ["scan"]
        for _, selector in self._sequenceSelectors:
            self.ui.inputSelector.parentWidget().layout().removeRow(selector)  # its label too
        self._sequenceSelectors = []
        self.ui.inputLabel.text = "Input volume:" if len(names) == 1 else f"{names[0]}:"
        for name in names[1:]:
            selector = slicer.qMRMLNodeComboBox()
            selector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
            selector.addEnabled = selector.removeEnabled = selector.noneEnabled = False
            selector.setMRMLScene(slicer.mrmlScene)
            selector.toolTip = f"The {name} scan, co-registered with the {names[0]} scan."
            selector.currentNodeChanged.connect(self.updateApplyButton)
            label = qt.QLabel(f"{name}:")
            self.ui.inputSelector.parentWidget().layout().insertRow(len(self._sequenceSelectors) + 1, label, selector)
            self._sequenceSelectors.append((label, selector))

    def inputNodes(self) -> list:
        """The input volume, then one node per further sequence of the model (in its order)."""
        return [self._parameterNode.inputVolume, *(selector.currentNode() for _, selector in self._sequenceSelectors)]

    def onModelActivated(self, index: int) -> None:
        text = self.ui.modelComboBox.itemText(index)
        if text == ADD_CARD:
            path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), "Model card", "", "Model card (*.json)")
        elif text == ADD_BUNDLE:
            folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(),
                                                         "MONAI bundle, nnU-Net model or nnU-Net results folder")
            path = self.addModelFolder(folder) if folder else ""
        else:
            path = self.ui.modelComboBox.itemData(index)
        if path:
            self._parameterNode.targetClass = ""
            self.selectModel(path)
        else:  # dialog cancelled: back to the current model
            self.ui.modelComboBox.currentIndex = self.ui.modelComboBox.findData(self._parameterNode.model)

    def onTargetChanged(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.targetClass = self.ui.targetComboBox.itemData(index) or ""

    def onMethodsChanged(self) -> None:
        self._parameterNode.methods = ",".join(n for n, box in self._methodCheckBoxes.items() if box.checked)

    # ---------------------------------------------------------------- run
    def updateApplyButton(self, caller=None, event=None) -> None:
        if self.logic.job is not None and self.logic.job.running:
            self.ui.applyButton.text, self.ui.applyButton.enabled = "Cancel", True
            self.ui.applyButton.toolTip = "Stop the run; the scene stays as it was before it."
        elif not self._catalogueLoaded:
            self.ui.applyButton.text, self.ui.applyButton.enabled = "Install dependencies...", True
            self.ui.applyButton.toolTip = "SegXAI needs PyTorch and a few Python packages; install them after asking."
        else:
            ready = bool(self._parameterNode and all(self.inputNodes()) and self._parameterNode.methods
                         and self._parameterNode.model)
            self.ui.applyButton.text, self.ui.applyButton.enabled = "Apply", ready
            self.ui.applyButton.toolTip = ("Segment the input and compute the chosen explanations." if ready
                                           else "Choose an input volume, a model and at least one method.")

    def onApplyButton(self) -> None:
        if self.logic.job is not None and self.logic.job.running:
            self.logic.cancel()
            self.onTimer()
            return
        if not self._catalogueLoaded:
            with slicer.util.tryWithErrorDisplay("Installing SegXAI's Python packages failed.", waitCursor=True):
                if installDependencies():
                    self.loadCatalogue()
            return
        p = self._parameterNode
        question = None
        with slicer.util.tryWithErrorDisplay("SegXAI could not read the model.", waitCursor=True):
            question = modelTrustQuestion(p.model)
        if question and not slicer.util.confirmYesNoDisplay(question, windowTitle="Run the model's code?"):
            return
        self.ui.logTextEdit.clear()
        self.log(f"Explaining {p.inputVolume.GetName()} with {p.model}: {p.methods} on {p.device}")
        with slicer.util.tryWithErrorDisplay("SegXAI could not start.", waitCursor=True):
            inputs = self.inputNodes()
            self.logic.run(inputs if len(inputs) > 1 else p.inputVolume, p.model, p.methods,
                           targetClass=p.targetClass or None, device=p.device,
                           wait=False, onProgress=self.onProgress, onLog=self.log, trustModelCode=bool(question))
            self.ui.progressBar.value = 0
            self._timer.start()
        self.updateApplyButton()

    def onTimer(self) -> None:
        """Drain the child's output on the GUI thread; when it ends, report and show the results."""
        job = self.logic.job
        if job is None:
            self._timer.stop()
            return
        if job.poll():
            return
        self._timer.stop()
        self.updateApplyButton()
        if job.state == "succeeded":
            self.ui.progressBar.value = 100
            self.ui.statusLabel.text = "Done."
            self.updateResults()
            self.ui.layerComboBox.currentIndex = 1 if self.ui.layerComboBox.count > 1 else 0
        elif job.state == "cancelled":
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "Cancelled; the scene is as before."
        else:
            self.ui.statusLabel.text = "Failed."
            self.log(f"error: {job.error}")
            slicer.util.errorDisplay(f"SegXAI failed: {job.error}")

    def onProgress(self, event) -> None:
        self.ui.progressBar.value = int(round(100 * self.logic.job.fraction))
        self.ui.statusLabel.text = f"{event.stage}: {event.message}" if event.message else event.stage

    def log(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)
        logging.info(f"SegXAI: {text}")

    # ------------------------------------------------------------ results
    def currentResults(self):
        return self.logic.results(self._parameterNode.inputVolume) if self._parameterNode else None

    def updateResults(self, *args) -> None:
        """The results section for the current input: its layers, scores and exports."""
        results = self.currentResults()
        self.ui.resultsCollapsibleButton.enabled = results is not None
        wasBlocked = self.ui.layerComboBox.blockSignals(True)
        self.ui.layerComboBox.clear()
        self.ui.layerComboBox.addItem("None", "")
        for node in results.maps if results else []:
            self.ui.layerComboBox.addItem(node.GetName(), node.GetID())
        shown = shownMap(slicer.mrmlScene, results.input) if results else None
        self.ui.layerComboBox.currentIndex = max(0, self.ui.layerComboBox.findData(shown.GetID() if shown else ""))
        self.ui.layerComboBox.blockSignals(wasBlocked)
        self.updateLayerControls()

        scores = caseScores(results.summary) if results else []
        shares = sequenceShares(results.summary) if results else []
        self.ui.scoresLabel.text = "<br>".join(
            [f"{html.escape(s.label)}: <b>{html.escape(s.text)}</b>" + (" (poor)" if s.poor else "") for s in scores]
            + ([("Relied on (integrated gradients): " + ", ".join(
                f"{html.escape(q.name)} <b>{100 * q.share:.0f} %</b>" for q in shares))] if shares else [])
        ) or "No case-level scores for these methods."
        verdict, level = reviewVerdict(results.summary) if results else ("", "ok")
        self.ui.reviewLabel.text = verdict
        self.ui.reviewLabel.setStyleSheet(VERDICT_STYLES[level])
        self.ui.exportDicomSegButton.visible = bool(results) and cameFromDicom(results.input)

    def selectedMap(self):
        nodeID = self.ui.layerComboBox.currentData
        return slicer.mrmlScene.GetNodeByID(nodeID) if nodeID else None

    def onLayerChanged(self, index: int) -> None:
        showMap(slicer.mrmlScene, self.selectedMap(), self._parameterNode.opacity)
        self.updateLayerControls()

    def updateLayerControls(self) -> None:
        """Threshold, colour range and description of the shown layer (disabled when none is)."""
        node = self.selectedMap()
        for widget in (self.ui.thresholdSliderWidget, self.ui.colorRangeWidget, self.ui.colorLegendCheckBox):
            widget.enabled = node is not None
        self.ui.layerDescriptionLabel.text = node.GetDescription() if node else ""
        if node is None:
            return
        low, high = mapWindow(node)
        for widget, values in ((self.ui.thresholdSliderWidget, None), (self.ui.colorRangeWidget, (low, high))):
            wasBlocked = widget.blockSignals(True)
            if values is None:
                widget.value = mapThreshold(node)
            else:
                array = slicer.util.arrayFromVolume(node)
                widget.setRange(min(float(array.min()), low), max(float(array.max()), high))
                widget.setValues(*values)
            widget.blockSignals(wasBlocked)
        legend = slicer.modules.colors.logic().GetColorLegendDisplayNode(node)
        wasBlocked = self.ui.colorLegendCheckBox.blockSignals(True)
        self.ui.colorLegendCheckBox.checked = bool(legend and legend.GetVisibility())
        self.ui.colorLegendCheckBox.blockSignals(wasBlocked)

    def onOpacityChanged(self, value: float) -> None:
        if self.selectedMap() is not None:
            showMap(slicer.mrmlScene, self.selectedMap(), value)

    def onThresholdChanged(self, value: float) -> None:
        if self.selectedMap() is not None:
            setMapThreshold(self.selectedMap(), value)

    def onColorRangeChanged(self, low: float, high: float) -> None:
        if self.selectedMap() is not None and high > low:
            setMapWindow(self.selectedMap(), low, high)

    def onColorLegendToggled(self, checked: bool) -> None:
        node = self.selectedMap()
        if node is None:
            return
        legend = slicer.modules.colors.logic().GetColorLegendDisplayNode(node)
        if checked and legend is None:
            legend = slicer.modules.colors.logic().AddDefaultColorLegendDisplayNode(node)
        if legend is not None:
            legend.SetVisibility(checked)

    def onExportLabelmap(self) -> None:
        results = self.currentResults()
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), "Export segmentation",
                                              f"{results.input.GetName()}-segmentation.nrrd",
                                              "NRRD (*.nrrd);;NIfTI (*.nii.gz)")
        if path:
            with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
                self.log(f"wrote {exportSegmentationToFile(results.segmentation, results.input, path)}")

    def onExportDicomSeg(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Folder for the DICOM SEG file")
        if folder:
            with slicer.util.tryWithErrorDisplay("DICOM SEG export failed.", waitCursor=True):
                for path in exportDicomSeg(self.currentResults().segmentation, folder):
                    self.log(f"wrote {path}")

    def onSaveScene(self) -> None:
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), "Save scene", "SegXAI-scene.mrb",
                                              "Medical Reality Bundle (*.mrb)")
        if path:
            with slicer.util.tryWithErrorDisplay("Saving the scene failed.", waitCursor=True):
                self.log(f"wrote {saveSceneBundle(slicer.mrmlScene, path)}")


#
# Dependencies
#


def dependenciesMissing() -> bool:
    """Whether torch or one of Resources/requirements.txt is missing from Slicer's Python."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return True
    return bool(missingRequirements(readRequirements()))


def installDependencies() -> bool:
    """Install torch through the PyTorch extension and the rest with pip, asking first; ``True`` when done."""
    try:
        import PyTorchUtils
    except ImportError:
        slicer.util.errorDisplay("SegXAI needs the PyTorch extension: install it from the Extensions Manager "
                                 "and restart Slicer.")
        return False
    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    if not torchLogic.torchInstalled():
        if torchLogic.installTorch(askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT) is None:
            return False
    missing = missingRequirements(readRequirements())
    if not missing:
        return True
    try:
        from slicer.packaging import pip_ensure  # Slicer 5.12 and later: asks, installs, offers a restart
    except ImportError:
        pip_ensure = None
    if pip_ensure is not None:
        pip_ensure(missing, skip_packages=list(SLICER_PROVIDED), requester="SegXAI")
    else:  # Slicer 5.10
        if not slicer.util.confirmOkCancelDisplay("SegXAI will install these Python packages:\n"
                                                  + "\n".join(missing) + "\nThis can take a few minutes."):
            return False
        slicer.util.pip_install(" ".join(missing))
    return not missingRequirements(readRequirements())


#
# SegXAILogic
#


class SegXAILogic(ScriptedLoadableModuleLogic, ExplainLogic):
    """The module's logic; usable without the GUI, e.g. from Slicer's Python console::

        logic = slicer.util.getModuleLogic("SegXAI")  # or SegXAI.SegXAILogic()
        results = logic.run(volumeNode, "brain-lesion-unet", ["gradcam", "tta"])  # targetClass=None, device="auto"
        results.segmentation, results.maps

    ``wait=False`` returns the running job instead (poll it with a timer; ``logic.cancel()`` stops it).
    Everything but the parameter node comes from :class:`SegXAILogic.ExplainLogic` (no Qt).
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        ExplainLogic.__init__(self)

    def getParameterNode(self):
        return SegXAIParameterNode(super().getParameterNode())

    def volumeFromNode(self, volumeNode):
        """A SegXAILib Volume copied from a scalar volume node (voxels and IJK-to-RAS)."""
        return volumeFromNode(volumeNode)

    def updateNodeFromVolume(self, volumeNode, volume) -> None:
        """Set a volume node's voxels and IJK-to-RAS from a SegXAILib Volume."""
        updateNodeFromVolume(volumeNode, volume)


#
# SegXAITest
#


class SegXAITest(ScriptedLoadableModuleTest):
    """Self-test run by Slicer's "Reload and Test" and by ctest: the whole flow in real Slicer.

    Data shipped with the extension's requirements, nothing downloaded: a synthetic tumour placed in the
    MNI152 template (from nilearn), explained by the bundled model. The same checks run outside Slicer
    in Testing/ (slicer-core).
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegXAI_logic_and_parameter_node()
        self.setUp()
        self.test_SegXAI_explain_show_export_cancel()

    def test_SegXAI_logic_and_parameter_node(self):
        logic = SegXAILogic()
        parameterNode = logic.getParameterNode()
        self.assertIsNone(parameterNode.inputVolume)
        self.assertEqual(parameterNode.model, DEFAULT_MODEL)
        self.assertEqual(parameterNode.device, "auto")

    def sampleCase(self):
        """A synthetic tumour placed in MNI152 (seed 20001, as in segxai demo), as a volume node."""
        from SegXAILib.data.lesion import synthesize_lesion
        from SegXAILib.data.samples import load_host

        case = synthesize_lesion(load_host("mni152"), seed=20001)
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "SegXAI sample")
        SegXAILogic().updateNodeFromVolume(node, case.image)
        node.CreateDefaultDisplayNodes()
        return node

    def test_SegXAI_explain_show_export_cancel(self):
        import numpy as np

        from SegXAILib.volume import read_volume

        self.delayDisplay("Placing a synthetic tumour in MNI152")
        inputNode = self.sampleCase()
        inputArray = slicer.util.arrayFromVolume(inputNode).copy()
        logic = SegXAILogic()
        folder = tempfile.mkdtemp(prefix="SegXAI-test-")

        self.delayDisplay("Segmenting and explaining (Grad-CAM) in a child process")
        results = logic.run(inputNode, DEFAULT_MODEL, ["gradcam"], outDir=os.path.join(folder, "out"))
        self.assertEqual(len(results.maps), 1)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(inputNode), inputArray)  # input untouched
        gradcam = results.map("gradcam")
        mapFile = os.path.join(folder, "out", results.summary["maps"][0]["file"])
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(gradcam), read_volume(mapFile).array)
        inputMatrix, mapMatrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        inputNode.GetIJKToRASMatrix(inputMatrix)
        gradcam.GetIJKToRASMatrix(mapMatrix)
        np.testing.assert_array_equal(slicer.util.arrayFromVTKMatrix(mapMatrix),
                                      slicer.util.arrayFromVTKMatrix(inputMatrix))

        self.delayDisplay("Showing Grad-CAM over the slices, then none")
        slicer.util.setSliceViewerLayers(background=inputNode, fit=True)
        showMap(slicer.mrmlScene, gradcam, 0.5)
        self.assertIs(shownMap(slicer.mrmlScene, inputNode), gradcam)
        showMap(slicer.mrmlScene, None)
        self.assertIsNone(shownMap(slicer.mrmlScene, inputNode))

        self.delayDisplay("Exporting the segmentation and saving the scene")
        exported = exportSegmentationToFile(results.segmentation, inputNode, os.path.join(folder, "seg.nrrd"))
        np.testing.assert_array_equal(read_volume(exported).array,
                                      read_volume(os.path.join(folder, "out", "segmentation.nii.gz")).array)
        self.assertTrue(os.path.getsize(saveSceneBundle(slicer.mrmlScene, os.path.join(folder, "scene.mrb"))) > 0)

        self.delayDisplay("Cancelling a second run")
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        job = logic.run(inputNode, DEFAULT_MODEL, ["gradcam"], wait=False)
        while job.poll() and job.fraction == 0.0:  # until the child is at work
            slicer.app.processEvents()
            time.sleep(0.05)
        logic.cancel()
        self.assertEqual(job.state, "cancelled")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.assertIs(logic.results(inputNode).segmentation, results.segmentation)
        self.delayDisplay("Test passed")
