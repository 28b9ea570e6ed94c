"""The output directory of `data_prep shards`: one run at a time, only its own files replaced, temps
cleaned up, content fingerprinted, a full disk reported in one line."""
from __future__ import annotations

import json
import re
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
    (out / ".tmp-tokenizer.999998").mkdir()  # as one killed while installing the tokenizer copy leaves it
    (out / ".tmp-tokenizer.999998" / "vocab.txt").write_text("[PAD]\n")
    with monkeypatch.context() as m:
        m.setattr(fsutil.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
        with pytest.raises(PrepError, match=f"writing {out / 'x.json'}: No space left on device"):
            fsutil.atomic_write_json(out / "x.json", {"a": 1})
    assert sorted(p.name for p in out.glob(".tmp-*")) == [left_over.name, ".tmp-tokenizer.999998"]
    run_shards([small_en], tokenizer_dir, out)
    assert not list(out.rglob(".tmp-*"))


def test_the_tokenizer_copy_is_never_seen_half_written_by_another_node(small_en, tokenizer_dir, tmp_path,
                                                                      monkeypatch):
    # Nodes of a multi-node run check --out for foreign files while another node installs the
    # tokenizer copy: at no write of it may the directory hold a copy without its vocab_info.json.
    from data_prep import manifest, vocab

    out, seen = tmp_path / "out", []
    write = vocab.atomic_write_text

    def write_and_look(path, text, durable=True):
        write(path, text, durable)
        seen.append(manifest.foreign_files(out))

    monkeypatch.setattr(vocab, "atomic_write_text", write_and_look)
    run_shards([small_en], tokenizer_dir, out)
    assert seen and all(f == [] for f in seen)
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == sorted(vocab.TOKENIZER_FILES)
    assert not list(out.glob(".tmp-*"))


def test_a_tokenizer_copy_installed_first_by_another_node_is_kept_when_it_matches(tokenizer_dir, tmp_path):
    from data_prep.vocab import install_tokenizer_dir, read_tokenizer, tokenizer_info, train_wordpiece

    tok = read_tokenizer(tokenizer_dir)
    info = tokenizer_info(tok)
    install_tokenizer_dir(tok, tmp_path / "copy", info)
    install_tokenizer_dir(tok, tmp_path / "copy", info)  # the second node: theirs is kept
    other = train_wordpiece(lambda: iter(["a different corpus of words"] * 50), 200, lowercase=True)
    with pytest.raises(PrepError, match=r"copy: written meanwhile by another process with tokenizer .*mismatched"):
        install_tokenizer_dir(other, tmp_path / "copy", tokenizer_info(other))
    assert tokenizer_info(read_tokenizer(tmp_path / "copy")).sha256 == info.sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


FOREIGN = {"manifest.json": b'{"mine": true}\n', "train-000000.tar": b"my own tar\n",
           "tokenizer/vocab.txt": b"[PAD]\nmy\nvocab\n", "progress/train-000000.tar.json": b'{"mine": true}\n'}


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_a_foreign_file_in_out_stops_the_run_untouched(small_en, tokenizer_dir, tmp_path, name, overwrite):
    out = tmp_path / "out"
    (out / name).parent.mkdir(parents=True)
    (out / name).write_bytes(FOREIGN[name])
    with pytest.raises(PrepError, match=f"{out / name}: not written by data_prep"):
        run_shards([small_en], tokenizer_dir, out, overwrite=overwrite)
    assert (out / name).read_bytes() == FOREIGN[name]
    assert not list(out.glob("*.tar")) or name.endswith(".tar")


def test_a_foreign_shard_after_a_run_is_neither_deleted_nor_replaced(small_en, tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    first = run_shards([small_en], tokenizer_dir, out)
    stray = out / "train-000099.tar"  # past the last unit: a rerun would delete it as stale
    stray.write_bytes(b"not ours")
    for overwrite in (False, True):
        with pytest.raises(PrepError, match=f"{stray}: not written by data_prep"):
            run_shards([small_en], tokenizer_dir, out, overwrite=overwrite)
    assert stray.read_bytes() == b"not ours"
    stray.unlink()
    assert run_shards([small_en], tokenizer_dir, out) == first


def test_overwrite_replaces_only_what_data_prep_wrote(small_en, tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    run_shards([small_en], tokenizer_dir, out)
    mine = {"notes.txt": b"notes", "progress/README": b"mine", "tokenizer/LICENSE": b"mine too",
            "manifest.backup.json": b'{"mine": true}'}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    again = run_shards([small_en], tokenizer_dir, out, overwrite=True, shards__seq_len=64)
    assert again["sample_format"]["seq_len"] == 64
    assert {name: (out / name).read_bytes() for name in mine} == mine
    from data_prep.report import verify_dir
    assert verify_dir(out) == ([], [])


def test_out_inside_an_input_directory_is_not_read_as_corpus(small_en, tokenizer_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "en.txt").write_bytes(small_en.read_bytes())
    out = corpus / "shards"
    first = run_shards([corpus], tokenizer_dir, out)
    capsys.readouterr()
    second = run_shards([corpus], tokenizer_dir, out)
    assert second["corpus"]["input_files"] == first["corpus"]["input_files"] == 1
    assert second == first and " 0 built" in capsys.readouterr().err
    with pytest.raises(PrepError, match=f"input {out / 'manifest.json'} is an output of data_prep"):
        run_shards([corpus / "en.txt", out / "manifest.json"], tokenizer_dir, out)
    here = tmp_path / "here"  # the output directory may hold the corpus: only data_prep's own files are skipped
    here.mkdir()
    (here / "en.txt").write_bytes(small_en.read_bytes())
    assert run_shards([here / "en.txt"], tokenizer_dir, here)["shards"] == first["shards"]


def test_a_different_corpus_is_refused_unless_overwrite(small_en, tokenizer_dir, tmp_path):
    other = write_lines(tmp_path / "other.txt", english_docs(120_000)[::-1])
    out = tmp_path / "out"
    first = run_shards([small_en], tokenizer_dir, out)
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    with pytest.raises(PrepError, match="built from other documents .*different corpus.*--overwrite"):
        run_shards([other], tokenizer_dir, out)
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before
    assert json.loads((out / "manifest.json").read_text()) == first
    second = run_shards([other], tokenizer_dir, out, overwrite=True)
    assert second["fingerprint"] != first["fingerprint"]
    assert second["settings_fingerprint"] == first["settings_fingerprint"]
    assert run_shards([other], tokenizer_dir, tmp_path / "again")["fingerprint"] == second["fingerprint"]


def test_a_smaller_corpus_is_refused_unless_overwrite(small_en, tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    first = run_shards([small_en], tokenizer_dir, out, shards__val_fraction=0.0)
    lines = small_en.read_text().splitlines(keepends=True)
    half = tmp_path / "half.txt"
    half.write_text("".join(lines[: len(lines) // 2]))
    with pytest.raises(PrepError, match="different corpus"):
        run_shards([half], tokenizer_dir, out, shards__val_fraction=0.0)
    assert json.loads((out / "manifest.json").read_text()) == first
    assert len(run_shards([half], tokenizer_dir, out, overwrite=True, shards__val_fraction=0.0)["shards"]) < \
        len(first["shards"])


def test_a_manifest_of_the_previous_format_is_still_resumed(small_en, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "out"
    first = run_shards([small_en], tokenizer_dir, out)
    old = dict(first, fingerprint=first["settings_fingerprint"])  # before: the settings alone
    del old["settings_fingerprint"]
    (out / "manifest.json").write_text(json.dumps(old))
    capsys.readouterr()
    assert run_shards([small_en], tokenizer_dir, out) == first
    assert f"0 built, {len(first['shards'])} already done" in capsys.readouterr().err


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KB tmpfs (needs root), smaller than the run's shards; unmounted at the end."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_a_full_disk_is_one_line_naming_the_file_and_the_run_resumes(slow_inputs, small_disk):
    from data_prep.report import verify_dir
    from data_prep.fsutil import sha256_file

    out = small_disk / "out"
    args = slow_shards_args(slow_inputs, out)
    args[args.index("--dupe-factor") + 1] = "1"
    args[args.index("--text-per-shard-mb") + 1] = "0.05"
    full = subprocess.run(args, env=ENV, capture_output=True, text=True)
    assert full.returncode == 1, full.stderr[-3000:]
    assert "Traceback" not in full.stderr and "Exception ignored" not in full.stderr, full.stderr[-3000:]
    last = full.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: writing {re.escape(str(out))}/\S+: No space left on device", last), last
    finished = [json.loads(p.read_text()) for p in (out / "progress").glob("*.json")]
    finished = [r for r in finished if "sha256" in r]
    assert finished and all(sha256_file(out / r["name"]) == r["sha256"] for r in finished)
    subprocess.run(["mount", "-o", "remount,size=256m", str(small_disk)], check=True)
    resumed = subprocess.run(args, env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f" {len(finished)} already done" in resumed.stderr
    assert verify_dir(out) == ([], []) and not list(out.rglob(".tmp-*"))
