"""Experiment binaries (absl): `python -m experiments.<name>`."""

import os

# TensorFlow's C++ INFO and WARNING lines (CUDA probing, CPU features) drown
# the per-round progress lines; errors still show. Set before TF is imported.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import logging

# TensorFlow's SavedModel writer logs every asset at INFO on each checkpoint.
logging.getLogger('tensorflow').setLevel(logging.WARNING)

# Imported for its side effect: it replaces the execution context TFF creates
# at import, whose leftover worker manager otherwise prints an AttributeError
# at every exit of a binary that never starts a worker (privacy_report).
from dp_fedavg import execution  # noqa: E402,F401  # pylint: disable=g-import-not-at-top,unused-import
