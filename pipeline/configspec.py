"""Typed, frozen config dataclasses built from plain YAML data, with errors that name the key path.

Each config section is a frozen dataclass whose fields are declared with :func:`option`, which
records the help text and the constraints (range, choices, path) used both to validate and to
generate docs/config.md. Stages declare their own sections; `pipeline.config` assembles them from the registry.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

#: Longest message a ConfigError shows: a huge offending value is cut, not printed whole.
MAX_MESSAGE_CHARS = 400
#: Integers must fit the 64-bit columns and counters they end up in.
MAX_INT = 2**63 - 1


class ConfigError(ValueError):
    """A bad config value. `str(err)` is `key.path: what was expected, got what`."""

    def __init__(self, key_path: str, message: str) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = f"{message[:MAX_MESSAGE_CHARS]}… ({len(message):,} characters)"
        if len(key_path) > MAX_MESSAGE_CHARS:
            key_path = f"{key_path[:MAX_MESSAGE_CHARS]}…"
        self.key_path = key_path
        self.message = message
        super().__init__(f"{key_path}: {message}" if key_path else message)


def option(
    default: Any,
    *,
    help: str,
    range: tuple[float | None, float | None] | None = None,
    path: bool | str = False,
    open_low: bool = False,
    open_high: bool = False,
) -> Any:
    """A config field with documentation and validation metadata.

    `range=(lo, hi)` bounds numbers (None = unbounded side; `open_low`/`open_high` exclude the end).
    `path=True` marks a file-system path resolved relative to the config file's folder (local paths
    only; URLs such as `s3://...` are left alone). `path="if_exists"` resolves it only when that file
    exists (for values that may be a name or a path, like `clip.pretrained`).
    """
    metadata = {"help": help, "range": range, "path": path, "open_low": open_low, "open_high": open_high}
    if isinstance(default, list | dict | set):
        raise TypeError("use tuples for sequence defaults: config objects are frozen")
    return dataclasses.field(default=default, metadata=metadata)


def resolve_path(value: Any, mode: bool | str, base_dir: Path) -> Any:
    """A path-typed value (or each string of a list of them) made absolute against `base_dir`.

    The one rule for config paths: the YAML file's folder for values in the file, the current directory for
    `--set` values. URLs (`s3://...`) and empty strings are left alone; `mode="if_exists"` resolves a value only
    when that file exists (a value that may be a name, like an open_clip tag, or a relative file path).
    """
    if isinstance(value, list | tuple):
        return type(value)(resolve_path(v, mode, base_dir) for v in value)
    if not mode or not isinstance(value, str) or not value or "://" in value:
        return value
    p = Path(value).expanduser()
    p = Path(os.path.normpath(p if p.is_absolute() else base_dir / p))
    if mode == "if_exists" and not p.exists():
        return value
    return str(p)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if tp is bool:
        return "a boolean (true/false)"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is tuple:
        return f"a list of {_type_name(get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return str(tp)


def _range_text(meta: Mapping[str, Any]) -> str:
    lo, hi = meta["range"]
    left = "(" if meta.get("open_low") else "["
    right = ")" if meta.get("open_high") else "]"
    lo_s = "-inf" if lo is None else f"{lo:g}"
    hi_s = "inf" if hi is None else f"{hi:g}"
    if lo is not None and hi is None and not meta.get("open_low"):
        return f">= {lo_s}"
    if lo is not None and hi is None:
        return f"> {lo_s}"
    return f"in {left}{lo_s}, {hi_s}{right}"


def _check_range(value: float, meta: Mapping[str, Any], key_path: str, kind: str) -> None:
    if not meta.get("range"):
        return
    lo, hi = meta["range"]
    bad = (
        (lo is not None and (value < lo or (meta.get("open_low") and value == lo)))
        or (hi is not None and (value > hi or (meta.get("open_high") and value == hi)))
    )
    if bad:
        raise ConfigError(key_path, f"expected {kind} {_range_text(meta)}, got {value!r}")


def _convert(value: Any, tp: Any, key_path: str, meta: Mapping[str, Any], base_dir: Path | None) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for arg in non_none:
            try:
                return _convert(value, arg, key_path, meta, base_dir)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(key_path, f"expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(key_path, f"expected a mapping, got {value!r}")
        return build(tp, value, key_path, base_dir)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(key_path, f"expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            raise ConfigError(key_path, f"expected {_type_name(tp)}, got {value!r}")
        (item_tp, *_rest) = get_args(tp)
        return tuple(_convert(v, item_tp, f"{key_path}[{i}]", meta, base_dir) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key_path, f"expected {_type_name(tp)}, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            kind = f"an integer {_range_text(meta)}" if meta.get("range") else "an integer"
            raise ConfigError(key_path, f"expected {kind}, got {value!r}")
        if abs(value) > MAX_INT:
            raise ConfigError(key_path, f"expected an integer of at most {MAX_INT:,} in size, got {value!r}")
        _check_range(value, meta, key_path, "an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            kind = f"a number {_range_text(meta)}" if meta.get("range") else "a number"
            raise ConfigError(key_path, f"expected {kind}, got {value!r}")
        if not math.isfinite(value):  # YAML's .nan / .inf: every comparison with NaN is false
            raise ConfigError(key_path, f"expected a finite number, got {value!r}")
        _check_range(float(value), meta, key_path, "a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key_path, f"expected a string, got {value!r}")
        if meta.get("path") and base_dir is not None:
            return resolve_path(value, meta["path"], base_dir)
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key_path}")


def build(cls: type, data: Mapping[str, Any], key_path: str = "", base_dir: Path | None = None) -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys and bad values by key path."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            where = f"{key_path}.{key}" if key_path else str(key)
            known = ", ".join(sorted(fields))
            # the likely intended key first: the list of known keys may be cut at MAX_MESSAGE_CHARS
            close = difflib.get_close_matches(str(key).lower(), list(fields), n=2, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ConfigError(where, f"unknown key{hint} (known keys here: {known})")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if dataclasses.is_dataclass(hints[name]):  # absent section: defaults, but still validated
                kwargs[name] = build(hints[name], {}, f"{key_path}.{name}" if key_path else name, base_dir)
            continue
        where = f"{key_path}.{name}" if key_path else name
        kwargs[name] = _convert(data[name], hints[name], where, f.metadata, base_dir)
    try:
        obj = cls(**kwargs)
    except TypeError as err:  # a required field is missing
        missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            where = f"{key_path}.{missing[0]}" if key_path else missing[0]
            raise ConfigError(where, "is required") from err
        raise
    check = getattr(obj, "validate", None)
    if callable(check):
        check(key_path)
    return obj


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Rows of (key path, type, default, help) for docs, recursing into nested sections."""
    rows: list[tuple[str, str, str, str]] = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        where = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, where))
            continue
        meta = f.metadata
        type_text = _type_name(tp)
        if meta.get("range"):
            type_text += f", {_range_text(meta)}"
        if f.default is dataclasses.MISSING:
            default = "required"
        elif isinstance(f.default, tuple):
            default = "[" + ", ".join(repr(v) if not dataclasses.is_dataclass(v) else "…" for v in f.default) + "]"
        else:
            default = "null" if f.default is None else repr(f.default)
        rows.append((where, type_text, default, meta.get("help", "")))
    return rows
