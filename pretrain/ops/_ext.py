"""Loading of the ``bertforge_C`` CUDA extension (csrc/), shared by the ops in this package.

Order of attempts, on the first call of :func:`load_extension` (the ops call it on first use):

1. ``import bertforge_C``: the extension built by ``pip install`` (setup.py) on a machine with a
   CUDA build of torch and nvcc.
2. A JIT build of the ``csrc/`` sources with :func:`torch.utils.cpp_extension.load`, only for a
   source checkout (``csrc/`` beside the package) on a machine where CUDA is usable.  The first
   build takes minutes; torch caches it under ``TORCH_EXTENSIONS_DIR``.
3. Otherwise the ops use their pure-PyTorch references, and exactly one message says so (WARNING
   when a CUDA device is present, since that costs speed; INFO on CPU-only machines).

``BERTFORGE_CUDA_EXT`` (the same switch as setup.py): ``0`` never loads the extension; ``1``
makes a failure to load it an error instead of a fallback; unset: best effort.
"""
import logging
import os
import threading
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

log = logging.getLogger("pretrain.ops")

EXT_NAME = "bertforge_C"
CSRC_DIR = Path(__file__).resolve().parents[2] / "csrc"
# Same nvcc flags as setup.py; the JIT build targets the visible GPUs (or TORCH_CUDA_ARCH_LIST).
NVCC_FLAGS = ["-O3", "--use_fast_math", "-std=c++17", "-lineinfo"]
IMPLS = ("auto", "cuda", "reference")

_lock = threading.Lock()
_attempted = False
_module: Optional[ModuleType] = None
_status = "not loaded yet (loaded on first use of a pretrain.ops kernel)"


def _switch() -> str:
    return os.environ.get("BERTFORGE_CUDA_EXT", "").strip()


def _jit_build() -> ModuleType:
    from torch.utils.cpp_extension import load

    sources = sorted(str(p) for p in [*CSRC_DIR.glob("*.cpp"), *CSRC_DIR.glob("*.cu")])
    log.info("pretrain.ops: JIT-building %s from %s (first use; this takes a few minutes)",
             EXT_NAME, CSRC_DIR)
    return load(
        name=EXT_NAME,
        sources=sources,
        extra_include_paths=[str(CSRC_DIR)],
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=list(NVCC_FLAGS),
        verbose=False,
    )


def _try_load() -> "tuple[Optional[ModuleType], str]":
    if _switch() == "0":
        return None, "disabled by BERTFORGE_CUDA_EXT=0"
    try:
        import bertforge_C  # type: ignore[import-not-found]

        return bertforge_C, f"loaded the installed {EXT_NAME}"
    except (ImportError, OSError) as exc:
        import_error = f"{EXT_NAME} is not installed or does not load ({exc})"
    if torch.version.cuda is None:
        return None, f"{import_error}; torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return None, f"{import_error}; no CUDA device is available"
    if not (CSRC_DIR / "bindings.cpp").is_file():
        return None, f"{import_error}; no csrc/ sources to JIT-build from (not a source checkout)"
    try:
        return _jit_build(), f"JIT-built {EXT_NAME} from {CSRC_DIR}"
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the references
        return None, f"{import_error}; the JIT build failed: {exc}"


def load_extension() -> Optional[ModuleType]:
    """The extension module, or None when it is unavailable (then logs the reason, once)."""
    global _attempted, _module, _status
    if _attempted:
        return _module
    with _lock:
        if _attempted:
            return _module
        module, status = _try_load()
        _module, _status, _attempted = module, status, True
    if module is None:
        if _switch() == "1":
            raise RuntimeError(f"BERTFORGE_CUDA_EXT=1 but the CUDA extension is unavailable: {status}")
        level = logging.WARNING if torch.cuda.is_available() else logging.INFO
        log.log(level, "pretrain.ops: CUDA kernels unavailable (%s); LayerNorm, masked softmax "
                "and LAMB use their PyTorch reference implementations", status)
    return module


def cuda_available() -> bool:
    """True when the fused CUDA kernels can run here (extension loaded and a CUDA device)."""
    return load_extension() is not None and torch.cuda.is_available()


def extension_status() -> str:
    """Human-readable loading status (why the kernels are or are not in use)."""
    return _status


def require_extension() -> ModuleType:
    module = load_extension()
    if module is None:
        raise RuntimeError(f"pretrain.ops: the CUDA extension is unavailable: {_status}")
    return module


def use_kernel(impl: str, op: str, on_cuda: bool, unsupported: Optional[str]) -> bool:
    """Decide kernel vs reference for one call.

    impl: "auto" (kernel when possible, else reference), "cuda" (kernel or an error),
    "reference".  on_cuda: the inputs are CUDA tensors.  unsupported: None when the kernel
    handles these arguments, else the reason it does not (e.g. a float64 input).
    """
    if impl == "reference":
        return False
    if impl == "auto":
        return load_extension() is not None and on_cuda and unsupported is None
    if impl == "cuda":
        if unsupported is not None:
            raise ValueError(f"{op}(impl='cuda'): the CUDA kernel does not support this call: {unsupported}")
        if not on_cuda:
            raise ValueError(f"{op}(impl='cuda'): the inputs are not CUDA tensors")
        require_extension()
        return True
    raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")


def _reset_for_tests() -> None:
    """Forget the loading attempt (tests only)."""
    global _attempted, _module, _status
    with _lock:
        _attempted, _module, _status = False, None, "not loaded yet"
