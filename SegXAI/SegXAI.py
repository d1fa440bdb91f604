"""SegXAI: explainable 3D segmentation in 3D Slicer (module skeleton).

Runs only inside Slicer. The work is done by the SegXAILib engine; the MRML-only (Qt-free) glue
lives in the SegXAILogic package next to this file, so that it can be tested with slicer-core.
"""

import logging

import slicer
from slicer import vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

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
SegXAI segments 3D medical images and explains the result: which voxels of the scan drove the
segmentation, shown as heat-map layers over the slices.
<p>This version is the module skeleton: pick an input volume. Segmentation and explanations arrive
in a later version.</p>
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
    """The module's state, saved with the scene.

    inputVolume - the scan to segment and explain.
    """

    inputVolume: vtkMRMLScalarVolumeNode


#
# SegXAIWidget
#


class SegXAIWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: loads Resources/UI/SegXAI.ui and binds it to the parameter node."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

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

        # Apply stays disabled (set in the .ui) until segmentation and explanations are implemented.
        self.ui.applyButton.toolTip = "Segmentation and explanations arrive in a later version of SegXAI."

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Binds widgets that have the SlicerParameterName dynamic property (inputSelector).
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)


#
# SegXAILogic
#


class SegXAILogic(ScriptedLoadableModuleLogic):
    """The module's logic; usable without the GUI (e.g. from the Python console).

    The Qt-free parts live in the SegXAILogic package; they need the SegXAILib engine installed
    in Slicer's Python, so they are imported when used and the module loads without it.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return SegXAIParameterNode(super().getParameterNode())

    def volumeFromNode(self, volumeNode):
        """A SegXAILib Volume copied from a scalar volume node (voxels and IJK-to-RAS)."""
        from SegXAILogic import volumeFromNode

        return volumeFromNode(volumeNode)

    def updateNodeFromVolume(self, volumeNode, volume) -> None:
        """Set a volume node's voxels and IJK-to-RAS from a SegXAILib Volume."""
        from SegXAILogic import updateNodeFromVolume

        updateNodeFromVolume(volumeNode, volume)


#
# SegXAITest
#


class SegXAITest(ScriptedLoadableModuleTest):
    """Self-test run by Slicer's "Reload and Test" and by ctest.

    A stub for the skeleton: it checks that the logic and its parameter node can be created.
    The volume bridge is tested outside Slicer in Testing/test_slicer_volume_bridge.py.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegXAI_logic_and_parameter_node()

    def test_SegXAI_logic_and_parameter_node(self):
        self.delayDisplay("Starting the test")
        logic = SegXAILogic()
        parameterNode = logic.getParameterNode()
        self.assertIsNotNone(parameterNode)
        self.assertIsNone(parameterNode.inputVolume)
        logging.info("SegXAI skeleton test passed")
        self.delayDisplay("Test passed")
