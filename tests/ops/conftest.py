"""Fixtures for the pretrain.ops tests: CPU tests run everywhere; GPU tests skip without CUDA."""
import os

import pytest
import torch

from pretrain.ops import _ext

from .emulation import emulated_kernels


@pytest.fixture(scope="session")
def cuda_ext():
    """The loaded bertforge_C extension on a CUDA machine.

    Skips without a CUDA device (or with BERTFORGE_CUDA_EXT=0).  With a device, an extension that
    fails to load is a test FAILURE, not a skip: a broken build must not pass the GPU suite.
    """
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the GPU kernel tests need one")
    if os.environ.get("BERTFORGE_CUDA_EXT", "").strip() == "0":
        pytest.skip("BERTFORGE_CUDA_EXT=0 disables the CUDA extension")
    module = _ext.load_extension()
    assert module is not None, f"a CUDA device is present but the extension is unavailable: {_ext.extension_status()}"
    return module


@pytest.fixture
def emulated(monkeypatch):
    """CPU stand-ins for the bertforge custom ops (see emulation.py), impl="auto"/"cuda" routed to them."""
    with emulated_kernels(monkeypatch):
        yield


@pytest.fixture
def fresh_ext_state():
    """Forget the extension loading attempt before and after the test."""
    _ext._reset_for_tests()
    yield
    _ext._reset_for_tests()
