"""Config validation in one voice, for every file revmix reads (experiments, sweeps, objectives, clusters).

A message names the dotted path of the bad value (list items by index: ``stages.0.objective.beta``), says
what was expected and what was found, lists the valid keys or choices and suggests close matches.
:func:`validate` checks data against a pydantic model (or any type) and turns pydantic's
``ValidationError`` into such a message by walking the types along each error's location. The same walk
serves dotted overrides (:func:`set_path`) and the one-line-per-field help (:func:`describe_fields`).
"""

from __future__ import annotations

import difflib
import functools
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import annotated_types as at
import yaml
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined


class ConfigError(ValueError):
    """A config problem, always naming the dotted path (and file, when known)."""


class Strict(BaseModel):
    """Base of every config model: unknown keys are errors and numbers are finite (no inf/nan)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SweepError(ConfigError):
    """A sweep-file problem; the message names the file and the offending key or path."""


def did_you_mean(key: object, valid: Iterable[str], n: int = 3) -> str:
    """`` (did you mean 'a', 'b'?)`` for the ``n`` closest matches of ``key`` among ``valid``; empty when none is
    close. The one spelling-suggestion helper of revmix (configs, sweeps, cluster files, metric names)."""
    close = difflib.get_close_matches(str(key), list(valid), n=n)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def unwrap(tp: Any) -> Any:
    """``tp`` without ``Annotated`` metadata and without ``| None``."""
    while True:
        if typing.get_origin(tp) is Annotated:
            tp = typing.get_args(tp)[0]
        elif _is_union(tp) and type(None) in typing.get_args(tp):
            rest = tuple(a for a in typing.get_args(tp) if a is not type(None))
            tp = rest[0] if len(rest) == 1 else Union[rest]  # noqa: UP007 - built from a runtime tuple
        else:
            return tp


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def is_model(tp: Any) -> typing.TypeGuard[type[BaseModel]]:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


class OpenTagged:
    """Base of a type told apart by its ``name`` key like a tagged union, whose members are known only when
    a value is read (plug-ins): ``members()`` maps names to models, and a lookup may resolve a name that
    iteration does not list. :func:`tagged_members` answers with it, so paths, overrides and help work alike."""

    @classmethod
    def members(cls) -> Mapping[str, type[BaseModel]]:
        raise NotImplementedError(f"{cls.__name__} must implement members()")


def tagged_members(tp: Any) -> Mapping[str, type[BaseModel]]:
    """The models of a union told apart by their ``name`` literal, by name (empty for any other type)."""
    tp = unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, OpenTagged):
        return tp.members()
    if not _is_union(tp):
        return {}
    members = [m for m in typing.get_args(tp) if is_model(m) and "name" in m.model_fields]
    return {tag: m for m in members for tag in typing.get_args(unwrap(m.model_fields["name"].annotation))}


def child(tp: Any, key: object) -> tuple[Any, FieldInfo | None]:
    """The type (and field, for a model) at ``key`` inside ``tp``; ``(None, None)`` when there is none."""
    tp = unwrap(tp)
    if is_model(tp):
        field = tp.model_fields.get(str(key))
        return (field.annotation, field) if field else (None, None)
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (list, tuple) and args:
        return args[0], None
    if typing.get_origin(tp) is dict and args:
        return args[1], None
    return None, None


class _Where(typing.NamedTuple):
    path: list[str]
    tp: Any  # the type at the error's location
    field: FieldInfo | None
    parent: Any  # the model holding the last key
    tag: tuple[str, str] | None  # (union field, member name) when the parent is a tagged-union member


def _locate(root: Any, loc: tuple[int | str, ...], prefix: list[str]) -> _Where:
    """Walk ``loc`` through the types: drop union tags and branch labels, keep keys and list indices."""
    path, tp, field, parent, tag, parent_tag = list(prefix), root, None, None, None, None
    for elem in loc:
        members = tagged_members(tp)
        if members and str(elem) in members:
            tp, tag = members[str(elem)], (path[-1] if path else "value", str(elem))
            continue
        if _is_union(unwrap(tp)):  # a plain union's branch label: a model's name, or "str", "dict[str,any]"
            tp = next((m for m in typing.get_args(unwrap(tp)) if is_model(m) and m.__name__ == elem), None)
            continue
        parent, parent_tag = tp, tag
        path.append(str(elem))
        (tp, field), tag = child(tp, elem), None
    return _Where(path, tp, field, parent, parent_tag)


def bounds_text(constraints: Iterable[Any]) -> str:
    """A number's bounds as a reader writes them: ``[0, 1)`` with both ends, ``> 0`` or ``<= 10`` with
    one, "" with none (the error messages here and ``revmix objectives list`` share it)."""
    low = high = None
    for c in constraints:
        if isinstance(c, at.Gt | at.Ge):
            low = ("(", ">", c.gt) if isinstance(c, at.Gt) else ("[", ">=", c.ge)
        elif isinstance(c, at.Lt | at.Le):
            high = (")", "<", c.lt) if isinstance(c, at.Lt) else ("]", "<=", c.le)
    if low and high:
        return f"{low[0]}{low[2]:g}, {high[2]:g}{high[0]}"
    return " and ".join(f"{b[1]} {b[2]:g}" for b in (low, high) if b)


def _bounds(w: _Where) -> str:
    constraints = list(w.field.metadata) if w.field else []
    if typing.get_origin(w.tp) is Annotated:
        for m in typing.get_args(w.tp)[1:]:
            constraints += m.metadata if isinstance(m, FieldInfo) else [m]
    text = bounds_text(constraints)
    return f"in {text}" if text.startswith(("[", "(")) else text


_EXPECTED = {
    "int": "an integer",
    "float": "a number",
    "bool": "true/false",
    "string": "a string",
    "list": "a list",
    "tuple": "a list",
    "dict": "a mapping",
    "model": "a mapping",
    "model_attributes": "a mapping",
}


def _text(err: Any, w: _Where) -> str:
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    tagged = f" for {w.tag[0]} {w.tag[1]!r}" if w.tag else ""
    if kind == "extra_forbidden":
        valid = [k for k in unwrap(w.parent).model_fields if not (w.tag and k == "name")]
        where = tagged[1:] if w.tag else f"at {'.'.join(w.path[:-1]) or 'the top level'}"
        return f"unknown key {w.path[-1]!r} {where}{did_you_mean(w.path[-1], valid)}; valid keys: {', '.join(valid)}"
    if kind == "missing":
        return "required key missing" + tagged
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        names = list(tagged_members(w.tp))
        if kind == "union_tag_not_found":
            return f"required key missing; one of {', '.join(names)}"
        return f"{ctx['tag']!r} is not one of {', '.join(names)}{did_you_mean(ctx['tag'], names)}"
    if kind == "literal_error" and typing.get_origin(unwrap(w.tp)) is Literal:
        choices = [str(c) for c in typing.get_args(unwrap(w.tp))]
        return f"{value!r} is not one of {', '.join(choices)}{did_you_mean(value, choices)}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal") and _bounds(w):
        noun = "an integer" if unwrap(w.tp) is int else "a number"
        return f"expected {noun} {_bounds(w)}, got {value!r}"
    if kind == "too_short":
        shape = "mapping" if isinstance(value, dict) else "list"
        items = {int: " of integers", float: " of numbers", str: " of strings"}.get(
            unwrap(child(w.tp, 0)[0]), ""
        )
        want = (
            f"a non-empty {shape}{items}"
            if ctx.get("min_length") == 1
            else f"at least {ctx.get('min_length')} items"
        )
        return f"expected {want}, got {value!r}"
    if kind == "finite_number":
        return f"expected a finite number, got {value!r}"
    stem = kind.rsplit("_", 1)[0] if kind.endswith(("_type", "_parsing", "_from_float")) else ""
    if kind == "int_from_float":
        stem = "int"
    if stem in _EXPECTED:
        return f"expected {_EXPECTED[stem]}, got {value!r}"
    return str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")


def explain(error: ValidationError, root: Any, path: str = "") -> str:
    """One ``path: message`` per bad value (the first per path), joined by ``; ``."""
    prefix = path.split(".") if path else []
    out: dict[str, str] = {}
    for err in error.errors():
        if err["type"] == "too_short" and len(err["input"]) >= err["ctx"]["min_length"]:
            continue  # a tuple whose items failed also reports itself too short: the items say why
        w = _locate(root, err["loc"], prefix)
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            w = w._replace(path=[*w.path, "name"])
        where = ".".join(w.path)
        out.setdefault(where, f"{where}: {_text(err, w)}" if where else _text(err, w))
    return "; ".join(out.values())


@functools.cache
def _adapter(tp: Any) -> TypeAdapter[Any]:
    return TypeAdapter(tp)


def validate(tp: Any, data: Any, path: str = "") -> Any:
    """``data`` validated as ``tp`` (a pydantic model or any type); a :class:`ConfigError` names each bad
    value's dotted path, prefixed by ``path``."""
    try:
        return tp.model_validate(data) if is_model(tp) else _adapter(tp).validate_python(data)
    except ValidationError as e:
        raise ConfigError(explain(e, tp, path)) from None


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=1"`` → ``("a.b", 1)``; the value is parsed as YAML (numbers, lists, null, …)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected PATH=VALUE, e.g. stages.0.lr=0.001")
    path, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string; users mean a number
        try:
            value = float(value)
        except ValueError:
            pass
    return path.strip(), value


def load_raw(path: str | Path, what: str = "config") -> dict:
    """The top-level mapping of a YAML ``what`` file (config, sweep, …); errors name the file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what} file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


def set_path(raw: dict, path: str, value: Any, model: type[BaseModel]) -> None:
    """Set a dotted ``path`` (``stages.1.lr``) inside ``raw``, data for ``model``; a missing parent starts
    from its default. List items go by index and must exist; keys are checked when ``raw`` is validated."""
    parts = path.split(".")
    node: Any = raw
    tp: Any = model
    for i, key in enumerate(parts):
        where = ".".join(parts[:i]) or "the top level"
        slot: int | str = key
        if isinstance(node, list):
            if not key.lstrip("-").isdigit():
                raise ConfigError(f"{path}: {where} is a list; expected an index, got {key!r}")
            slot = int(key)
            if not -len(node) <= slot < len(node):
                raise ConfigError(f"{path}: index {slot} out of range; {where} has {len(node)} item(s)")
        elif not isinstance(node, dict):
            raise ConfigError(f"{path}: {where} is a value, not a mapping")
        if i == len(parts) - 1:
            node[slot] = value
            return
        members = tagged_members(tp)
        if members and isinstance(node, dict) and node.get("name") in members:
            tp = members[node["name"]]  # e.g. an objective: its own fields and defaults
        tp, field = child(tp, key)
        if isinstance(node, dict) and node.get(key) is None:
            node[key] = _sparse(field.get_default(call_default_factory=True) if field else None)
        node = node[slot]


def _sparse(default: Any) -> Any:
    """A missing parent's default as raw data: models keep their ``name`` and non-default values only
    (validation refills the rest), so overriding an objective's ``name`` inherits no other keys."""
    if isinstance(default, BaseModel):
        named = default.model_dump(mode="json", include={"name"})
        return named | default.model_dump(mode="json", exclude_defaults=True)
    if isinstance(default, list):
        return [_sparse(item) for item in default]
    return {} if default is None or default is PydanticUndefined else default


def describe_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per dotted path of ``model`` with its default and reason; list items as ``N``, and every
    member of a tagged union (``stages.N.objective (name: dpo)``) with its own fields."""
    lines = []
    for name, f in model.model_fields.items():
        path, tp = f"{prefix}{name}", unwrap(f.annotation)
        item = unwrap(typing.get_args(tp)[0]) if typing.get_origin(tp) is list else None
        sub, each = (tp, ".") if is_model(tp) else (item, ".N.")
        if is_model(sub):
            lines.append(f"{path}: {f.description}")
            lines.extend(describe_fields(sub, f"{path}{each}"))
        elif members := tagged_members(tp):
            lines.append(f"{path}: {f.description}")
            for tag, member in members.items():
                # the docstring's first line; a plug-in may have no docstring at all
                summary = next(iter((member.__doc__ or "").strip().splitlines()), "")
                lines.append(f"{path} (name: {tag}): {summary}")
                own = describe_fields(member, f"{path}.")
                lines.extend(ln for ln in own if not ln.startswith(f"{path}.name "))
        else:
            lines.append(f"{path} = {f.get_default(call_default_factory=True)!r}  # {f.description}")
    return lines
