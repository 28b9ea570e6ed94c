"""Loading of the CUDA extension: the BERTFORGE_CUDA_EXT switch and the single fallback message."""
import logging

import pytest
import torch

from pretrain import ops
from pretrain.ops import _ext


def test_switch_zero_disables_the_extension(fresh_ext_state, monkeypatch, caplog):
    monkeypatch.setenv("BERTFORGE_CUDA_EXT", "0")
    with caplog.at_level(logging.INFO, logger="pretrain.ops"):
        assert _ext.load_extension() is None
        assert _ext.load_extension() is None
        assert not ops.cuda_available()
    assert "BERTFORGE_CUDA_EXT=0" in _ext.extension_status()
    assert len([r for r in caplog.records if "reference implementations" in r.getMessage()]) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure mode of a machine without CUDA")
def test_switch_one_makes_a_missing_extension_an_error(fresh_ext_state, monkeypatch):
    monkeypatch.setenv("BERTFORGE_CUDA_EXT", "1")
    try:
        import bertforge_C  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("bertforge_C is installed here")
    with pytest.raises(RuntimeError, match="BERTFORGE_CUDA_EXT=1"):
        _ext.load_extension()


def test_use_kernel_contract(fresh_ext_state, monkeypatch):
    monkeypatch.setenv("BERTFORGE_CUDA_EXT", "0")
    assert _ext.use_kernel("reference", "op", True, None) is False
    assert _ext.use_kernel("auto", "op", True, None) is False  # no extension
    with pytest.raises(ValueError, match="does not support"):
        _ext.use_kernel("cuda", "op", True, "float64 input")
    with pytest.raises(ValueError, match="not CUDA tensors"):
        _ext.use_kernel("cuda", "op", False, None)
    with pytest.raises(RuntimeError, match="unavailable"):
        _ext.use_kernel("cuda", "op", True, None)
    with pytest.raises(ValueError, match="impl must be one of"):
        _ext.use_kernel("fused", "op", True, None)
