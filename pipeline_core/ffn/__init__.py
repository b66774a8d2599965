"""Flood-filling network (FFN) segmentation: model, MPI data-parallel training, flood-filling
inference, distributed inference with reconciliation.

Importing this package sets two TensorFlow environment defaults *before* TensorFlow is imported
by any submodule (an explicit value in the environment always wins):

- ``TF_ENABLE_ONEDNN_OPTS=1``: TF only turns its oneDNN kernels on by default on CPUs it
  recognises as AVX-512 capable; on AVX2-only hosts the default is the Eigen path, whose Conv3D
  is ~1.6x slower here (see ``bench/ffn.py``).
- ``TF_CPP_MIN_LOG_LEVEL=2``: keep TF's C++ info lines out of stage logs.

Modules: :mod:`.model` (network, presets, FLOP count), :mod:`.data` (training-example sampling),
:mod:`.train` (training loop), :mod:`.inference` (flood filling), :mod:`.reconcile`
(subvolume plan, distributed inference, reconciliation).
"""

import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
