"""The consolidated-weights format: one directory any tool can read without DeepSpeed.

    CKPT_DIR/model.pt      torch.save of the model's fp32 state dict, vocabulary UNPADDED
                           (embeddings.word.weight has model.vocab_size rows), CPU tensors
    CKPT_DIR/config.yaml   the resolved run config (pretrain.config.dump_config)
    CKPT_DIR/extra.json    free-form JSON metadata, e.g. {"tokenizer_dir": ..., "fingerprints": {...}}
    CKPT_DIR/tokenizer/    the run's tokenizer files, copied (export ships these)

Unpadded, so the file does not depend on pad_vocab_multiple (a speed detail): load it into a
model with ``model.load_consolidated_state_dict(state_dict)``, which re-pads.  Each file is
written to a temporary name and moved into place with os.replace (atomic on one filesystem).

``load_weights`` accepts a checkpoint directory, its model.pt, or a checkpoint root holding a
``latest`` text file that names the checkpoint subdirectory to use.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
from typing import Optional

from data_prep.vocab import INFO_FILE, TOKENIZER_FILES
from pretrain.config import Config, dump_config, load_config

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.yaml"
EXTRA_FILE = "extra.json"
TOKENIZER_DIR = "tokenizer"
LATEST_FILE = "latest"
# Prefixes that wrappers add to parameter names: torch.compile, DDP / DeepSpeed engines.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def file_mode() -> int:
    """The mode open() gives a new file: 0666 less the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str, write) -> None:
    """Call write(file_object) on a temporary file beside ``path``, fsync it, then move it into place
    (pretrain's one atomic writer).  A failed write (disk full) removes the temporary file and
    raises write_error's CheckpointError.  The file gets the mode a plain open() would give it (0666
    less the umask), not mkstemp's 0600."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=f".{os.path.basename(path)}.")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(err, (OSError, RuntimeError)):   # torch.save reports write errors as RuntimeError
            raise write_error(path, err) from None
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (pretrain.checkpoint raises it; `pretrain train` exits 2)."""


class UnreadableFileError(CheckpointError, ValueError):
    """A file that is damaged, or that holds more than tensors and plain data (refused, never run)."""


def load_torch_file(path: str, allowed_globals=(), map_location="cpu"):
    """torch.load that unpickles only tensors, plain containers and ``allowed_globals`` (classes the
    caller knows the file must hold): a pickled payload is refused, never run.  Every failure is an
    UnreadableFileError whose one-line message names ``path``."""
    import torch
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            # torch.serialization.load, not torch.load: engine.safe_torch_load replaces the latter.
            return torch.serialization.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UnreadableFileError(f"{path}: missing") from None
    except pickle.UnpicklingError as err:
        unsafe = re.search(r"GLOBAL (\S+) was not an allowed global", str(err))
        if unsafe:
            raise UnreadableFileError(f"{path}: refused: it would unpickle {unsafe.group(1)}, which is not a tensor "
                                      "or plain data (a received file must not run code)") from None
        raise UnreadableFileError(f"{path}: not a readable torch file ({_weights_only_reason(err)})") from None
    except EOFError:
        raise UnreadableFileError(f"{path}: empty or truncated") from None
    except (RuntimeError, OSError, ValueError) as err:
        raise UnreadableFileError(f"{path}: not a readable torch file ({str(err).split('. ')[0]})") from None


def write_error(path: str, err: BaseException) -> CheckpointError:
    """The one-line error for a failed write of ``path``, with the free space left (disk full?)."""
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).strip().splitlines()[0]
    try:
        reason += f"; {shutil.disk_usage(os.path.dirname(path) or '.').free / 2**20:.1f} MiB free on its filesystem"
    except OSError:
        pass
    return CheckpointError(f"{path}: could not be written ({reason})")


def _weights_only_reason(err: Exception) -> str:
    """The line of torch's weights-only error that says what is wrong (the rest is advice)."""
    text = str(err)
    tail = text.split("WeightsUnpickler error:", 1)[-1]
    return next((line.strip() for line in tail.splitlines() if line.strip()), text.splitlines()[0])


def canonical_state_dict(state_dict: dict, config: Config) -> dict:
    """Wrapper prefixes stripped, fp32 CPU tensors, vocabulary unpadded."""
    from pretrain.model import trim_vocab
    clean = {}
    for key, tensor in state_dict.items():
        for prefix in WRAPPER_PREFIXES:
            key = key[len(prefix):] if key.startswith(prefix) else key
        clean[key] = tensor
    return trim_vocab(clean, config.model)


def save_weights(ckpt_dir: str, config: Config, state_dict: dict, extra: dict | None = None) -> None:
    """Write model.pt, config.yaml and extra.json into ckpt_dir (created if needed)."""
    import torch
    os.makedirs(ckpt_dir, exist_ok=True)
    try:
        extra_text = json.dumps(extra or {}, indent=2, sort_keys=True)
    except TypeError as err:
        raise TypeError(f"save_weights: extra must be JSON-serializable ({err})") from None
    weights = canonical_state_dict(state_dict, config)
    atomic_write(os.path.join(ckpt_dir, MODEL_FILE), lambda f: torch.save(weights, f))
    atomic_write_text(os.path.join(ckpt_dir, EXTRA_FILE), extra_text)
    atomic_write_text(os.path.join(ckpt_dir, CONFIG_FILE), dump_config(config))


def copy_tokenizer(source: str, dest: str) -> Optional[str]:
    """Copy a tokenizer (a directory holding tokenizer.json and/or vocab.txt, or one such file) into
    the directory ``dest``; return dest's absolute path, or None when ``source`` holds no tokenizer."""
    if os.path.isfile(source):
        name = "tokenizer.json" if source.endswith(".json") else "vocab.txt"
        pairs = [(source, name)]
        beside = os.path.join(os.path.dirname(source), "tokenizer_config.json")
        if name == "vocab.txt" and os.path.isfile(beside):   # its do_lower_case
            pairs.append((beside, "tokenizer_config.json"))
    else:   # the tokenizer's own files; data_prep's vocab_info.json stays behind
        pairs = [(os.path.join(source, n), n) for n in TOKENIZER_FILES
                 if n != INFO_FILE and os.path.isfile(os.path.join(source, n))]
    if not any(name in ("tokenizer.json", "vocab.txt") for _, name in pairs):
        return None
    os.makedirs(dest, exist_ok=True)
    for path, name in pairs:
        with open(path, "rb") as src:
            atomic_write(os.path.join(dest, name), lambda f, src=src: shutil.copyfileobj(src, f))
    return os.path.abspath(dest)


def resolve_checkpoint_dir(path: str) -> str:
    """The directory holding model.pt: ``path`` itself, its parent (path is model.pt), or ``latest``."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path} does not exist")
    if os.path.isfile(path):
        if os.path.basename(path) == MODEL_FILE:
            return os.path.dirname(os.path.abspath(path))
        raise ValueError(f"{path}: expected a checkpoint directory (holding {MODEL_FILE} and {CONFIG_FILE}), "
                         f"got a file")
    if os.path.isfile(os.path.join(path, MODEL_FILE)):
        return path
    latest = os.path.join(path, LATEST_FILE)
    if os.path.isfile(latest):
        with open(latest, encoding="utf-8") as f:
            name = f.read().strip()
        target = os.path.join(path, name)
        if not name or not os.path.isfile(os.path.join(target, MODEL_FILE)):
            raise FileNotFoundError(f"{latest} names {name!r}, but {target} holds no {MODEL_FILE}")
        return target
    raise FileNotFoundError(f"{path}: expected a checkpoint directory holding {MODEL_FILE} and {CONFIG_FILE}, "
                            f"or a checkpoint root with a '{LATEST_FILE}' file naming one; found neither")


def load_weights(path: str) -> tuple[Config, dict, dict]:
    """(Config, unpadded fp32 state dict, extra) from a checkpoint written by save_weights."""
    ckpt_dir = resolve_checkpoint_dir(path)
    config_path = os.path.join(ckpt_dir, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{ckpt_dir}: holds {MODEL_FILE} but no {CONFIG_FILE} (the run's resolved config)")
    config = load_config(config_path)
    model_path = os.path.join(ckpt_dir, MODEL_FILE)
    state_dict = load_torch_file(model_path)
    if not isinstance(state_dict, dict):
        raise ValueError(f"{model_path}: expected a state dict (name -> tensor), got {type(state_dict).__name__}")
    return config, state_dict, _read_extra(os.path.join(ckpt_dir, EXTRA_FILE))


def _read_extra(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    return read_json_object(path)


def read_json_object(path: str) -> dict:
    """The JSON object in ``path``; ValueError with a one-line message for a file that is not
    valid JSON (bad UTF-8 included) or holds something else than an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as err:            # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_model(path: str):
    """(model in eval mode, Config, extra) rebuilt from a consolidated-weights checkpoint, with the
    kernels its config names (each falls back to its PyTorch reference where it cannot run)."""
    from pretrain.model import build_model
    config, state_dict, extra = load_weights(path)
    model = build_model(config.model, config.kernels)
    model.load_consolidated_state_dict(state_dict)
    return model.eval(), config, extra
