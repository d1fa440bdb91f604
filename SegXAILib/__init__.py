"""SegXAILib: the SegXAI engine. Segment a 3D scan and explain the segmentation.

Independent of 3D Slicer: torch, MONAI, NumPy, SimpleITK. Entry points: :func:`read_volume`,
:func:`load_model`, :func:`segment`, and the ``segxai`` command line.
"""

__version__ = "0.1.0"
