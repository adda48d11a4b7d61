"""DCRIS: parameter-efficient referring image segmentation with DenseCrossAdapters on frozen DINOv2 and CLIP.

Build a model from a config (``dcris.config.preset``, ``dcris.model.build_model``); the ``dcris`` command line
(``dcris.cli``) counts parameters, converts released checkpoints, trains, evaluates, predicts and runs the demo.
"""

__version__ = "0.1.0"
