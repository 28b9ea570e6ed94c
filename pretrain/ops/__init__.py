"""Fused CUDA kernels (csrc/) with pure-PyTorch references that are also the CPU fallback.

* :func:`layer_norm` -- LayerNorm with an optional fused bias + residual add (``layer_norm.py``);
* :func:`scaled_masked_softmax` -- attention-score softmax with scale and mask (``softmax.py``);
* :mod:`pretrain.ops.lamb` (reference) / :mod:`pretrain.ops.lamb_fused` (multi-tensor kernel) --
  the two phases of LAMB with norms supplied from outside (ZeRO-compatible).

Each op takes ``impl="auto" | "cuda" | "reference"``.  The extension ``bertforge_C`` is loaded on
first use (:mod:`pretrain.ops._ext`); when it is unavailable the ops use the references and one
log message says why.  This package knows nothing of the model, the engine or configs.
"""
from ._ext import cuda_available, extension_status, load_extension
from .layer_norm import LN_MAX_HIDDEN, layer_norm, layer_norm_reference
from .softmax import MASKED_THRESHOLD, scaled_masked_softmax, scaled_masked_softmax_reference

__all__ = [
    "cuda_available",
    "extension_status",
    "load_extension",
    "layer_norm",
    "layer_norm_reference",
    "LN_MAX_HIDDEN",
    "scaled_masked_softmax",
    "scaled_masked_softmax_reference",
    "MASKED_THRESHOLD",
]
