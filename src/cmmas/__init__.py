"""cmmas: cross-modality multi-atlas segmentation of 3D medical images with deep networks."""

import os as _os

# oneDNN makes 3D convolutions 3-5x faster and ~4x leaner on CPU; it must be set before
# TensorFlow is imported (GUIDE.md section 5). Users may still override it.
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
