"""The one configuration engine of data_prep and pretrain (pretrain imports it; it imports nothing
else of bertforge).

A config is a tree of dataclasses; every field has a docstring (the string literal on the line
after it), which is its documentation: ``reference`` renders it, ``keys`` carries it to
command-line help.  ``setting(...)`` adds what a plain default cannot say: an allowed range
(``ge``/``gt``/``le``/``lt``), that the value is a path, command-line flag names.

Loading: ``read_file`` reads a YAML mapping (a key given twice, an empty file, a file that is
not YAML text are one-line ``ConfigFileError``\\ s naming the file), following a top-level
``base: other.yaml`` (relative to the file that names it) that the file extends; ``merge`` lays
one layer over another; ``parse_overrides`` turns ``section.key=value`` arguments into a layer.
``build`` makes the tree from the merged layers and raises one ``ConfigError`` listing every
problem: unknown keys (with the closest valid key), wrong types, values out of range, and the
cross-field ``Rules`` whose keys all hold valid values.

The path rule: a path is used as given, ``~`` expanded; a relative path is relative to the
current directory, wherever it was written (YAML file, base file, command line).  A resolved
config written out (a checkpoint's config.yaml, ``pretrain config``) then reads back as the same
config wherever it is stored.  Only ``base:`` itself is relative to the file that names it.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import difflib
import functools
import inspect
import math
import os
import re
import sys
import textwrap
import types
import typing
import warnings
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import yaml


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
class ConfigError(ValueError):
    """One or more configuration problems; ``problems`` lists them, ``str()`` shows them all."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} configuration problem(s){where}:\n{lines}")


class ConfigFileError(ValueError):
    """A config file that cannot be read as a YAML mapping; the message is one line naming the file."""


class ConfigWarning(UserWarning):
    """A setting that is valid but has no effect (e.g. a LAMB-only option with AdamW)."""


@contextlib.contextmanager
def collected_warnings() -> Iterator[list[str]]:
    """Within: ConfigWarnings are collected into the yielded list (their messages) instead of being
    printed in Python's ``file:line: ConfigWarning:`` form, so that a command can print each once,
    as ``warning: ...`` (on rank 0 only, in a distributed run).  Other warnings show as usual."""
    messages: list[str] = []
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, ConfigWarning):
                messages.append(str(message))
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.simplefilter("always", ConfigWarning)
        warnings.showwarning = show
        yield messages


# --------------------------------------------------------------------------------------------
# Fields
# --------------------------------------------------------------------------------------------
def setting(default: Any = MISSING, *, factory: Callable[[], Any] | None = None, ge=None, gt=None, le=None,
            lt=None, path: bool = False, flags: dict[str, Any] | str | None = None) -> Any:
    """A dataclass field with a range (inclusive ``ge``/``le``, exclusive ``gt``/``lt``), the path
    mark (``~`` expanded) and command-line ``flags`` (a flag name, or {flag: value it stores})."""
    meta = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt), ("flags", flags)) if v is not None}
    if path:
        meta["path"] = True
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class Key:
    """One leaf of a config tree: its dotted name, annotation, field and the dataclass declaring it."""

    dotted: str
    type: Any
    field: dataclasses.Field
    owner: type

    @property
    def doc(self) -> str:
        """The field's docstring (read from the source only when asked: help and the reference)."""
        return field_docs(self.owner).get(self.field.name, "")

    @property
    def default(self) -> Any:
        f = self.field
        return f.default_factory() if f.default_factory is not MISSING else f.default

    @property
    def bounds(self) -> dict:
        return {k: self.field.metadata[k] for k in ("ge", "gt", "le", "lt") if k in self.field.metadata}


def keys(cls: type, prefix: str = "") -> dict[str, Key]:
    """Every leaf key of the tree rooted at ``cls``, in declaration order (a new dict each call)."""
    return dict(_keys(cls, prefix))


@functools.cache
def _keys(cls: type, prefix: str) -> dict[str, Key]:
    hints = typing.get_type_hints(cls)
    out: dict[str, Key] = {}
    for f in dataclasses.fields(cls):
        dotted = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_keys(hints[f.name], dotted + "."))
        else:
            out[dotted] = Key(dotted, hints[f.name], f, cls)
    return out


def sections(cls: type, prefix: str = "") -> dict[str, type]:
    """Every dataclass of the tree by dotted name (the root as ``""``)."""
    out = {prefix.rstrip("."): cls}
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            out.update(sections(tp, f"{prefix}{name}."))
    return out


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: its docstring, whitespace collapsed} of dataclass ``cls`` and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


# --------------------------------------------------------------------------------------------
# Values: types, numbers, ranges
# --------------------------------------------------------------------------------------------
NOT_A_NUMBER, NOT_FINITE = "not a number", "not finite"


def finite_number(value) -> tuple[object, str | None]:
    """``(number, None)`` for a finite int or float (an int stays an int) or a string float() reads
    (PyYAML reads 1e-3 and 1E-3 as strings, not numbers); ``(number, NOT_FINITE)`` for an infinite or
    NaN one, or an int beyond the float range; ``(value, NOT_A_NUMBER)`` for anything else (a bool too)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value, NOT_A_NUMBER
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        return value, NOT_A_NUMBER
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int beyond the float range
        finite = False
    return value, None if finite else NOT_FINITE


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(the annotation without None, whether None is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), True
    return tp, False


def describe(tp: Any) -> str:
    """What annotation ``tp`` accepts, in words (used in problems and in the reference)."""
    inner, nullable = unwrap_optional(tp)
    if nullable:
        return describe(inner) + " or null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        item = typing.get_args(tp)[0]
        words = {int: "integers", float: "numbers", bool: "true/false", str: "strings"}.get(item)
        return "a list of " + (words or (f"{item.__name__} sections" if dataclasses.is_dataclass(item) else str(item)))
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def range_words(bounds: dict) -> str:
    """``>= 1``, ``> 0``, ``between 16 and 1048576`` or ``0 <= value < 1``."""
    if "ge" in bounds and "le" in bounds:
        return f"between {bounds['ge']} and {bounds['le']}"
    low = [(op, bounds[k]) for k, op in (("ge", ">="), ("gt", ">")) if k in bounds]
    high = [(op, bounds[k]) for k, op in (("le", "<="), ("lt", "<")) if k in bounds]
    if low and high:
        (low_op, low_value), (high_op, high_value) = low[0], high[0]
        return f"{low_value} {'<=' if low_op == '>=' else '<'} value {high_op} {high_value}"
    ((op, value),) = low or high
    return f"{op} {value}"


def _in_range(value, bounds: dict) -> bool:
    return not (("ge" in bounds and value < bounds["ge"]) or ("gt" in bounds and value <= bounds["gt"])
                or ("le" in bounds and value > bounds["le"]) or ("lt" in bounds and value >= bounds["lt"]))


class _Invalid(Exception):
    """A value that does not fit its annotation; the message is the problem."""


def _coerce(value: Any, tp: Any, key: str, widen_ints: bool, bounds: dict) -> Any:
    """``value`` checked against annotation ``tp`` (a number string read as a float; an int in a float
    field widened when ``widen_ints``; a single value for a list field made a list of one)."""
    inner, nullable = unwrap_optional(tp)
    if nullable:
        return None if value is None else _coerce(value, inner, key, widen_ints, bounds)
    bad = f"{key}: got {value!r}, expected {describe(tp)}"
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if any(value == a and type(value) is type(a) for a in allowed):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        raise _Invalid(bad + (f" (did you mean {close[0]!r}?)" if close else ""))
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            return [_coerce(value, item, key, widen_ints, {})]
        return [_coerce(v, item, f"{key}[{i}]", widen_ints, {}) for i, v in enumerate(value)]
    if tp is float:
        number, problem = finite_number(value)
        if problem == NOT_A_NUMBER:
            raise _Invalid(bad)
        if problem is not None:
            where = f" {range_words(bounds)}" if bounds else ""
            raise _Invalid(f"{key}: got {value!r}, expected a finite number{where}")
        return float(number) if (widen_ints or isinstance(number, float)) else number
    ok = {bool: isinstance(value, bool), int: isinstance(value, int) and not isinstance(value, bool),
          str: isinstance(value, str)}.get(tp, False)
    if not ok:
        raise _Invalid(bad)
    return value


def _value(value: Any, k: Key, widen_ints: bool) -> Any:
    """The checked value of key ``k`` (raises _Invalid)."""
    value = _coerce(value, k.type, k.dotted, widen_ints, k.bounds)
    if value is not None and k.bounds and not _in_range(value, k.bounds):
        raise _Invalid(f"{k.dotted}: got {value!r}, expected {range_words(k.bounds)}")
    if k.field.metadata.get("path") and value is not None:
        value = [os.path.expanduser(v) for v in value] if isinstance(value, list) else os.path.expanduser(value)
    return value


# --------------------------------------------------------------------------------------------
# Cross-field rules
# --------------------------------------------------------------------------------------------
class Rules(list):
    """Cross-field checks, each reading the dotted keys it names; ``build`` runs a check only when
    every one of its keys holds a valid value (a rule about a rejected value's default misleads)."""

    def check(self, *dotted: str):
        """Decorator: ``fn(cfg, *context) -> str | list[str] | None`` becomes a rule over ``dotted``."""
        def register(fn):
            self.append((dotted, fn))
            return fn
        return register

    def run(self, cfg, invalid: set[str], context: tuple) -> list[str]:
        out: list[str] = []
        for dotted, fn in self:
            if any(_covers(bad, k) for k in dotted for bad in invalid):
                continue
            found = fn(cfg, *context)
            out.extend([found] if isinstance(found, str) else found or [])
        return out


def _covers(bad: str, key: str) -> bool:
    return key == bad or key.startswith(bad + ".") or bad == ""


# --------------------------------------------------------------------------------------------
# Building the tree
# --------------------------------------------------------------------------------------------
def _unknown(dotted: str, names: list[str], known: dict[str, Key]) -> str:
    """``KEY: unknown key (did you mean 'CLOSEST'?)``, else the section's known keys."""
    prefix, _, leaf = dotted.rpartition(".")
    close = difflib.get_close_matches(leaf, names, n=1)
    if close:
        return f"{dotted}: unknown key (did you mean {(prefix + '.' if prefix else '') + close[0]!r}?)"
    same_leaf = [k for k in known if k.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        return f"{dotted}: unknown key (did you mean {same_leaf[0]!r}?)"
    return f"{dotted}: unknown key (known keys: {', '.join(names)})"


def _build(cls: type, data: Any, prefix: str, known: dict[str, Key], problems: list[str], invalid: set[str],
           widen_ints: bool):
    if not isinstance(data, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {data!r}")
        invalid.add(prefix.rstrip("."))
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in data.items():
        dotted = f"{prefix}{name}"
        if name not in names:
            problems.append(_unknown(dotted, names, known))
        elif dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], value, dotted + ".", known, problems, invalid, widen_ints)
        else:
            try:
                kwargs[name] = _value(value, known[dotted], widen_ints)
            except _Invalid as err:
                problems.append(str(err))
                invalid.add(dotted)
    return cls(**kwargs)


def build(cls: type, data: dict, *, source: str | None = None, rules: Rules | None = None, context: tuple = (),
          warn: Rules | None = None, widen_ints: bool = True):
    """The tree ``cls`` from nested mapping ``data``, every problem raised together in one
    ConfigError; ``warn`` rules' findings are issued as ConfigWarning.  ``context`` is passed to
    the rules after the config.  ``widen_ints=False`` keeps an int given for a float field an int."""
    problems: list[str] = []
    invalid: set[str] = set()
    cfg = _build(cls, data, "", keys(cls), problems, invalid, widen_ints)
    problems.extend((rules or Rules()).run(cfg, invalid, context))
    if problems:
        raise ConfigError(problems, source=source)
    for message in (warn or Rules()).run(cfg, invalid, context):
        warnings.warn(message, ConfigWarning, stacklevel=3)
    return cfg


# --------------------------------------------------------------------------------------------
# Layers: YAML files with bases, command-line overrides
# --------------------------------------------------------------------------------------------
def merge(base: dict, over: dict, alternatives: dict[str, tuple[tuple[str, ...], ...]] | None = None,
          _section: str = "") -> dict:
    """Lay mapping ``over`` on a copy of ``base``: nested mappings merge, anything else replaces.

    ``alternatives`` ({section: (key group, ...)}) names keys that say one thing two ways: a layer
    that sets one key of a group drops the others of the lower layer."""
    out = dict(base)
    for group in (alternatives or {}).get(_section, ()):
        given = [k for k in group if k in over]
        if len(given) == 1:
            for k in group:
                if k != given[0]:
                    out.pop(k, None)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value, alternatives, f"{_section}.{key}" if _section else str(key))
        else:
            out[key] = value
    return out


def unflatten(flat: dict) -> dict:
    """``{"shards.seq_len": 64}`` -> ``{"shards": {"seq_len": 64}}``."""
    tree: dict = {}
    for dotted, value in flat.items():
        node = tree
        *path, leaf = str(dotted).split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def parse_overrides(items: list[str], example: str) -> dict:
    """``["training.max_steps=10", "zero.stage=2"]`` as a nested mapping (values read as YAML)."""
    problems, tree = [], {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key or not all(key.split(".")):
            problems.append(f"override {item!r}: expected section.key=value (e.g. {example})")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        *path, leaf = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"override {item!r}: {part} is not a section")
                break
        else:
            node[leaf] = value
    if problems:
        raise ConfigError(problems, source="command line")
    return tree


SHIPPED_CONFIGS = "bertforge_configs"
"""The package the checkout's configs/ is installed as (setup.py's package_dir)."""


def config_path(name) -> str:
    """``name`` itself when it is a file, else the shipped config it names (``bert-base``, ``data/demo``,
    ``finetune/sst2.yaml``: configs/NAME[.yaml] of this checkout, or of the installed package when it was
    installed without one), else ``name`` unchanged (reading it then says it is missing)."""
    name = os.fspath(name)
    if os.path.exists(name) or os.path.isabs(name):
        return name
    for root in _config_roots():
        for candidate in (name, name + ".yaml"):
            path = os.path.join(root, *candidate.split("/"))
            if os.path.isfile(path):
                return path
    return name


def _config_roots() -> list[str]:
    roots = [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")]
    try:
        import importlib
        roots += list(importlib.import_module(SHIPPED_CONFIGS).__path__)   # a namespace package: data only
    except ModuleNotFoundError:
        pass
    return [r for r in roots if os.path.isdir(r)]


def shipped_configs() -> list[str]:
    """The names config_path knows (``bert-base``, ``data/demo``, ...)."""
    names = set()
    for root in _config_roots():
        for dirpath, _, files in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            names.update((f[:-5] if rel == "." else f"{rel}/{f[:-5]}") for f in files if f.endswith(".yaml"))
    return sorted(names)


def read_file(path, alternatives: dict | None = None, _chain: tuple[str, ...] = ()) -> dict:
    """The mapping of YAML file ``path`` (a file, or a shipped config's name: config_path) laid over its
    ``base:`` (relative to the file), recursively."""
    found = config_path(path)
    if not os.path.exists(found) and not _chain and not os.path.isabs(found) and os.sep not in found.strip("./"):
        raise ConfigFileError(f"config file not found: {found} (neither a file nor a shipped config: "
                              f"{', '.join(shipped_configs())})")
    path = os.path.abspath(found)
    if path in _chain:
        raise ConfigError([f"base: cycle {' -> '.join(_chain + (path,))}"], source=path)
    data = read_yaml_mapping(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError([f"base: expected a path to another YAML file, got {base!r}"], source=path)
    base_path = os.path.join(os.path.dirname(path), os.path.expanduser(base))
    return merge(read_file(base_path, alternatives, _chain + (path,)), data, alternatives)


# --------------------------------------------------------------------------------------------
# The strict YAML reader
# --------------------------------------------------------------------------------------------
class _RepeatedKey(yaml.YAMLError):
    def __init__(self, key, line: int, first_line: int):
        super().__init__(f"key {key!r} appears twice (first at line {first_line})")
        self.line = line


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last).
    Keys merged in with ``<<: *anchor`` may still be overridden, as YAML intends."""

    def construct_mapping(self, node, deep=False):
        first_lines: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in first_lines:
                    raise _RepeatedKey(key, line, first_lines[key])
                first_lines[key] = line
            except TypeError:  # an unhashable key: the base class reports it
                pass
        return super().construct_mapping(node, deep)


MAX_CONFIG_BYTES = 4 << 20


def read_yaml_mapping(path) -> dict:
    """The top-level mapping of YAML file ``path`` (StrictLoader).

    A missing, unreadable, oversized, non-UTF-8, invalid, empty or non-mapping file raises
    ConfigFileError."""
    path = Path(path)
    if path.is_dir():
        raise ConfigFileError(f"{path} is a directory; expected a YAML file")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigFileError(f"config file not found: {path}") from None
    except OSError as err:
        raise ConfigFileError(f"{path}: cannot read ({err.strerror or err})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigFileError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB; a config file is a few KB of YAML")
    try:
        data = yaml.load(raw.decode("utf-8"), Loader=StrictLoader)
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigFileError(f"{path}:{line}: not UTF-8 text (invalid byte at offset {err.start}); "
                              "expected a YAML file") from None
    except yaml.YAMLError as err:
        raise ConfigFileError(_yaml_problem(path, err)) from None
    if data is None:
        raise ConfigFileError(f"{path} is empty (no settings; delete it or drop --config to use the defaults)")
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: top level is a {type(data).__name__}; expected a mapping of sections")
    return data


def _yaml_problem(path: Path, err: yaml.YAMLError) -> str:
    """One line: FILE:LINE: what is wrong."""
    if isinstance(err, _RepeatedKey):
        return f"{path}:{err.line}: {err}"
    mark = getattr(err, "problem_mark", None)
    if mark is not None:
        return f"{path}:{mark.line + 1}: not valid YAML ({err.problem or err.context})"
    if isinstance(err, yaml.reader.ReaderError):
        return f"{path}: not valid YAML (character {err.character!r} at offset {err.position}: {err.reason})"
    return f"{path}: not valid YAML ({' '.join(str(err).split())})"


# --------------------------------------------------------------------------------------------
# The reference, generated from the field docstrings
# --------------------------------------------------------------------------------------------
def _default_words(k: Key) -> str:
    value = k.default
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value}`" if value != "" else '`""`'


def _type_words(k: Key) -> str:
    words = describe(k.type).replace("'", "`")
    if k.bounds:
        words += f", {range_words(k.bounds)}"
    if k.field.metadata.get("path"):
        words = words.replace("a list of strings", "a list of paths").replace("a string", "a path")
    return words


def reference(cls: type) -> str:
    """Markdown tables of every key of the tree ``cls`` (type, default, docstring), one per section."""
    out = []
    for name, section in sections(cls).items():
        rows = [k for k in keys(section, f"{name}." if name else "").values()
                if k.dotted.count(".") == (name.count(".") + 1 if name else 0)]
        if not rows:
            continue
        out.append(f"#### `{name}`" if name else "#### top level")
        out.append("\n| key | type | default | meaning |\n|---|---|---|---|")
        out += [f"| `{k.dotted}` | {_type_words(k)} | {_default_words(k)} | {k.doc.replace('|', '/')} |"
                for k in rows]
        out.append("")
    return "\n".join(out)


MARK = re.compile(r"(<!-- reference ([\w.]+):(\w+) -->\n).*?(<!-- end reference -->)", re.S)


def render_reference_doc(text: str) -> str:
    """``text`` with each ``<!-- reference module:Class -->`` ... ``<!-- end reference -->`` block
    regenerated (``python -m data_prep.settings FILE.md`` rewrites FILE.md this way)."""
    import importlib

    def block(m: re.Match) -> str:
        cls = getattr(importlib.import_module(m.group(2)), m.group(3))
        return f"{m.group(1)}\n{reference(cls)}\n{m.group(4)}"
    return MARK.sub(block, text)


if __name__ == "__main__":
    for doc in sys.argv[1:]:
        Path(doc).write_text(render_reference_doc(Path(doc).read_text()))
