"""Dataclass configs loaded from YAML with dotted command-line overrides.

Every trainer describes its settings as a (nested) dataclass. ``load_config`` builds one from a YAML
file plus ``a.b=value`` overrides, converting every value to the type its field annotation names
(``int``, ``float``, ``bool``, ``str``, ``Optional[...]``, ``list[...]``, ``tuple[...]``,
``Literal[...]``, ``dict[...]`` and nested dataclasses). Unknown keys fail loudly, naming the key and the
valid ones, because a typo in a recipe must never silently fall back to a default.

Example::

    @dataclass
    class OptimCfg:
        lr: float = 1e-3

    @dataclass
    class TrainCfg:
        steps: int = 100
        optim: OptimCfg = field(default_factory=OptimCfg)

    cfg = load_config(TrainCfg, "recipe.yaml", ["optim.lr=3e-4", "steps=10"])
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")

__all__ = [
    "add_config_args",
    "config_from_args",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "parse_overrides",
    "save_config",
]


class _Raw(str):
    """A value typed on the command line: converted from text according to the field's annotation."""


_TRUE = {"true", "yes", "on", "1", "y"}
_FALSE = {"false", "no", "off", "0", "n"}
_NONE = {"none", "null", "~", ""}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_types(cls: type) -> dict[str, Any]:
    # get_type_hints resolves string annotations written under `from __future__ import annotations`.
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def _coerce(value: Any, tp: Any, key: str, base: Any = None) -> Any:
    """Convert ``value`` to annotation ``tp``; ``key`` (dotted) names the field in errors.

    ``base``: the current value of a dataclass-typed field; a mapping is applied on top of it.
    """
    if tp is Any or tp is typing.Any:
        return yaml.safe_load(value) if isinstance(value, _Raw) else value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if origin is Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        non_none = [a for a in args if a is not type(None)]
        if type(None) in args and (value is None or (isinstance(value, _Raw) and value.lower() in _NONE)):
            return None
        errors = []
        for alt in non_none:
            try:
                return _coerce(value, alt, key, base)
            except (TypeError, ValueError) as err:
                errors.append(str(err))
        raise TypeError(f"config key '{key}': {value!r} matches none of {_type_name(tp)} ({'; '.join(errors)})")

    if origin is Literal:
        for option in args:
            if value == option or (isinstance(value, str) and str(option) == value):
                return option
        raise ValueError(f"config key '{key}': got {value!r}, expected one of {list(args)}")

    if _is_dataclass_type(tp):
        if isinstance(value, _Raw):
            value = yaml.safe_load(value)
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"config key '{key}': expected a mapping for {tp.__name__}, got {value!r}")
        return config_from_dict(tp, value, _prefix=key, _base=base if isinstance(base, tp) else None)

    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise TypeError(f"config key '{key}': expected a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise TypeError(f"config key '{key}': expected an int, got bool {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    as_float = float(value)
                except ValueError:
                    as_float = None
                if as_float is not None and as_float.is_integer():
                    return int(as_float)
        raise TypeError(f"config key '{key}': expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise TypeError(f"config key '{key}': expected a float, got bool {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads "1e-4" (no dot) as a string: accept any text float() understands.
            try:
                return float(value)
            except ValueError:
                pass
        raise TypeError(f"config key '{key}': expected a float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return str(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise TypeError(f"config key '{key}': expected a string, got {value!r}")
    if tp is type(None):
        if value is None or (isinstance(value, _Raw) and value.lower() in _NONE):
            return None
        raise TypeError(f"config key '{key}': expected null, got {value!r}")

    if origin in (list, tuple, Sequence, typing.Sequence) or tp in (list, tuple):
        if isinstance(value, _Raw):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"config key '{key}': expected a list, got {value!r}")
        if origin is tuple or tp is tuple:
            if args and not (len(args) == 2 and args[1] is Ellipsis):
                if len(args) != len(value):
                    raise ValueError(
                        f"config key '{key}': expected {len(args)} items for {_type_name(tp)}, got {value!r}"
                    )
                return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
            item = args[0] if args else Any
            return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
        item = args[0] if args else Any
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]

    if origin in (dict, Mapping, typing.Mapping) or tp is dict:
        if isinstance(value, _Raw):
            value = yaml.safe_load(value)
            _check_flow_mapping(value, key)
        if not isinstance(value, Mapping):
            raise TypeError(f"config key '{key}': expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, f"{key}.<key>"): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}

    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise TypeError(f"config key '{key}': expected {tp.__name__}, got {value!r}")
    # Annotations we do not understand (e.g. Callable) are passed through unchanged.
    return value


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def config_from_dict(
    cls: type[T], data: Mapping[str, Any] | None, _prefix: str = "", _base: Any = None
) -> T:
    """Build dataclass ``cls`` from a (nested) mapping; fields absent from ``data`` keep their defaults.

    Nested dataclass fields are updated on top of their default value *in the parent* (a parent's
    ``field(default_factory=lambda: Inner(lr=0.1))`` keeps ``lr=0.1`` when only ``inner.wd`` is given).

    Raises ValueError for a key that ``cls`` has no field for, naming the full dotted key and listing
    the valid ones.
    """
    if not _is_dataclass_type(cls):
        raise TypeError(f"config_from_dict: cls must be a dataclass type, got {cls!r}")
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise TypeError(f"config '{_prefix or cls.__name__}': expected a mapping, got {data!r}")
    types_ = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{_prefix}.{name}" if _prefix else str(name)
        if name not in types_:
            raise ValueError(
                f"unknown config key '{key}' for {cls.__name__}; valid keys: {', '.join(sorted(types_))}"
            )
        base = getattr(_base, name) if _base is not None else None
        if base is None and isinstance(value, (Mapping, _Raw)):
            base = _field_default(fields[name])
        base = base if dataclasses.is_dataclass(base) and not isinstance(base, type) else None
        kwargs[name] = _coerce(value, types_[name], key, base)
    if _base is not None:
        for name in fields:
            if name not in kwargs:
                kwargs[name] = copy.deepcopy(getattr(_base, name))
    try:
        return cls(**kwargs)
    except TypeError as err:  # e.g. a required field without default missing from the YAML
        raise ValueError(f"cannot build {cls.__name__} at '{_prefix or '<root>'}': {err}") from err


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a dataclass config (tuples become lists) that YAML can store."""

    def convert(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: convert(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        if isinstance(v, Mapping):
            return {k: convert(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise TypeError(f"config_to_dict: expected a dataclass instance, got {type(cfg).__name__}")
    return convert(cfg)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write ``cfg`` as YAML to ``path`` (parents created); ``load_config(type(cfg), path)`` reads it back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    tmp.replace(path)
    return path


def _check_flow_mapping(value: Any, key: str) -> None:
    """YAML reads ``{a:1}`` (no space after the colon) as the key ``"a:1"`` with no value; in a free-form
    mapping override that would pass silently, so it is an error that shows the two spellings that work."""
    if isinstance(value, Mapping):
        bad = [k for k, v in value.items() if v is None and isinstance(k, str) and ":" in k]
        if bad:
            name, _, val = bad[0].partition(":")
            raise ValueError(f"config key '{key}': {bad[0]!r} was read as a key with no value (YAML needs a space "
                             f"after ':'); write '{key}={{{name}: {val}}}' (quoted) or '{key}.{name}={val}'")


def parse_overrides(overrides: Sequence[str]) -> list[tuple[list[str], str]]:
    """``["a.b=1", ...]`` -> ``[(["a", "b"], "1"), ...]``; an item without ``=`` is a ValueError."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"config override {item!r} must look like key=value (e.g. optim.lr=3e-4)")
        key, value = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key or any(not part for part in key.split(".")):
            raise ValueError(f"config override {item!r} has an empty key")
        parsed.append((key.split("."), value))
    return parsed


def _apply_override(data: dict[str, Any], path: list[str], value: str) -> None:
    node: Any = data
    for depth, part in enumerate(path):
        last = depth == len(path) - 1
        if isinstance(node, list):  # `teachers.1.weight=2`: an index into a list
            if not part.isdigit() or int(part) >= len(node):
                raise ValueError(
                    f"config override '{'.'.join(path)}': '{part}' is not an index of the {len(node)}-item "
                    f"list at '{'.'.join(path[:depth])}'"
                )
            idx = int(part)
            if last:
                node[idx] = _Raw(value)
            else:
                if not isinstance(node[idx], dict):
                    node[idx] = {}
                node = node[idx]
            continue
        if last:
            node[part] = _Raw(value)
        else:
            if not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            node = node[part]


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build config ``cls`` from the YAML at ``path`` (optional), then apply ``key.sub=value`` overrides.

    Override values are converted by the field's annotation (``steps=10`` -> int, ``name=007`` stays the
    string "007", ``dims=[1,2]`` -> list, ``teacher=null`` -> None for Optional fields); a numeric path
    part indexes a list (``teachers.0.weight=0.5``).
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p} (pass an existing YAML path to --config)")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"config file {p} is not valid YAML: {err}") from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {p} must hold a mapping at the top level, got {type(loaded).__name__}")
        data = loaded
    cfg = config_from_dict(cls, data)
    if not overrides:
        return cfg
    # Overrides apply to the fully materialised config (YAML + defaults), so they can also index into
    # lists that only exist as defaults (`teachers.0.weight=2`).
    merged = config_to_dict(cfg)
    for keys, value in parse_overrides(overrides):
        _apply_override(merged, keys, value)
    return config_from_dict(cls, merged)


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--config PATH`` and trailing ``key=value`` overrides to ``parser``.

    Also accepts (and hides) ``--local_rank``, which the ``deepspeed`` launcher passes to every script;
    use the ``LOCAL_RANK`` environment variable (``mmfm.distributed``) instead.
    Use ``config_from_args(cls, args)`` on the parsed namespace.
    """
    parser.add_argument("--config", default=None, help="YAML config file (dataclass fields)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "overrides",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="dotted config overrides applied after the YAML, e.g. optim.lr=3e-4 steps=100",
    )
    return parser


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """``load_config(cls, args.config, args.overrides)`` for a parser set up by ``add_config_args``."""
    return load_config(cls, getattr(args, "config", None), getattr(args, "overrides", None) or ())
