"""The output directory of `data_prep shards`: one run at a time, only its own files replaced, temps
cleaned up, content fingerprinted, a full disk reported in one line."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from data_prep.cli import main
from data_prep.errors import PrepError
from tests.data_prep.conftest import english_docs, run_shards, write_lines
from tests.data_prep.test_stopping import ENV, slow_inputs, slow_shards_args, start_slow_run  # noqa: F401


@pytest.fixture(scope="module")
def small_en(tmp_path_factory) -> Path:
    return write_lines(tmp_path_factory.mktemp("small") / "en.txt", english_docs(60_000))


def test_a_second_run_into_a_busy_out_is_refused(slow_inputs, tmp_path, capsys):
    out = tmp_path / "out"
    first = start_slow_run(slow_inputs, out)
    try:
        corpus, tok = slow_inputs
        rc = main(["shards", "--input", str(corpus), "--tokenizer", str(tok), "--out", str(out), "--no-progress"])
        assert rc == 2
        assert capsys.readouterr().err.strip() == f"error: {out} is in use by pid {first.pid}"
    finally:
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-3000:]


def test_a_failed_write_leaves_no_temp_and_a_left_over_temp_is_removed(small_en, tokenizer_dir, tmp_path,
                                                                       monkeypatch):
    from data_prep import fsutil

    out = tmp_path / "out"
    run_shards([small_en], tokenizer_dir, out)
    left_over = out / ".tmp-manifest.json.999999"  # as a run killed while writing its manifest leaves it
    left_over.write_text("{")
    with monkeypatch.context() as m:
        m.setattr(fsutil.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
        with pytest.raises(PrepError, match=f"writing {out / 'x.json'}: No space left on device"):
            fsutil.atomic_write_json(out / "x.json", {"a": 1})
    assert sorted(p.name for p in out.glob(".tmp-*")) == [left_over.name]
    run_shards([small_en], tokenizer_dir, out)
    assert not list(out.rglob(".tmp-*"))
