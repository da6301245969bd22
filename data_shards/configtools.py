"""Typed configs as nested dataclasses: from/to JSON-like dicts and dotted overrides.

Each component owns a small dataclass that validates itself in ``__post_init__``; a run's
config nests them. This module only moves values in and out, and names the dotted field in
every error (``model.encoder.depth: expected int, got 'four'``).
"""

from __future__ import annotations

import ast
import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """An unknown or invalid config field; the message starts with its dotted path."""


def to_dict(cfg: Any) -> Any:
    """A dataclass (nested) -> plain JSON-compatible values (tuples become lists)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {str(k): to_dict(v) for k, v in cfg.items()}
    return cfg


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check / convert ``value`` to the annotated type ``tp`` (the few types configs use)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{path}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, path)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}")
        return tuple(
            _coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin in (list, dict) or tp in (list, dict):
        if not isinstance(value, origin or tp):
            raise ConfigError(f"{path}: expected a {(origin or tp).__name__}, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{path}: expected {tp.__name__}, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict, path: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys and bad values raise
    :class:`ConfigError` naming the dotted field."""
    names = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown field (known: {', '.join(names)})")
    hints = _hints(cls)
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path or cls.__name__}: {e}") from None


def parse_value(text: str) -> Any:
    """'3' -> 3, '0.1' -> 0.1, 'true' -> True, '[1,2]' -> [1, 2], 'none' -> None, else text."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(cfg: T, overrides: list[str]) -> T:
    """Return ``cfg`` with ``key.sub=value`` overrides applied (validated again)."""
    data = to_dict(cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{item!r}: expected key=value (e.g. model.encoder.depth=4)")
        parts = key.strip().split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: unknown field")
            node = node[part]
        if not isinstance(node, dict) or parts[-1] not in node:
            raise ConfigError(f"{key.strip()}: unknown field")
        node[parts[-1]] = parse_value(raw)
    return from_dict(type(cfg), data)


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass ``cls`` (and of its bases), by name: the
    string literal that follows the field in the class body, first sentence only."""
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:] + [None], strict=True):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):  # fmt: skip
                text = " ".join(after.value.value.split())
                docs[node.target.id] = text.split(". ")[0].rstrip(".")
    return docs


def describe(cfg: Any, prefix: str = "") -> list[str]:
    """One line per leaf field of a (nested) dataclass: ``dotted.name = value  # its doc``,
    what ``--set help`` prints."""
    lines = []
    docs = field_docs(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            lines += describe(value, f"{name}.")
            continue
        doc = docs.get(f.name)
        lines.append(f"{name} = {to_dict(value)!r}" + (f"  # {doc}" if doc else ""))
    return lines


def resolve(cfg: T, overrides: list[str], stage: str = "") -> T:
    """``cfg`` with the ``--set key=value`` overrides applied; ``--set help`` prints every field
    (:func:`describe`) and exits 0."""
    if "help" in overrides:
        head = f"fields of {stage} (--set KEY=VALUE):" if stage else "fields (--set KEY=VALUE):"
        print("\n".join([head, *("  " + line for line in describe(cfg))]))
        raise SystemExit(0)
    return apply_overrides(cfg, overrides) if overrides else cfg


def from_recipe(recipes: dict[str, Any], name: str, overrides: list[str], stage: str = "",
                **fields: Any) -> Any:  # fmt: skip
    """What every stage's command line builds: the named recipe, the command's flags (``fields``
    that are not None replace top-level fields), then the ``--set`` overrides (``--set help``
    prints every field and exits)."""
    if name not in recipes:
        raise ConfigError(f"unknown recipe {name!r}; choose from {', '.join(recipes)}")
    cfg = recipes[name]()
    given = {k: v for k, v in fields.items() if v is not None}
    if given:
        cfg = from_dict(type(cfg), {**to_dict(cfg), **to_dict(given)})
    return resolve(cfg, overrides, stage)
