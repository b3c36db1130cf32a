"""Component configs: attrs classes built from user params, with one clear error per bad field."""
from __future__ import annotations

import decimal
import difflib
import re
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any

import attrs

from hybridize.errors import ConfigError


@attrs.frozen(kw_only=True)
class ComponentRef:
    """A reference to a registered component: its name and the params of its config class."""

    name: str = attrs.field(validator=attrs.validators.instance_of(str))
    params: Mapping[str, Any] = attrs.field(factory=dict, converter=dict)

    @classmethod
    def parse(cls, value: Any, *, where: str) -> ComponentRef:
        """Accept ``"gdn"`` or ``{"name": "gdn", **params}``."""
        if isinstance(value, ComponentRef):
            return value
        if isinstance(value, str):
            return cls(name=value)
        if isinstance(value, Mapping) and isinstance(value.get("name"), str):
            params = {k: v for k, v in value.items() if k != "name"}
            return cls(name=value["name"], params=params)
        raise ConfigError(f"{where} must be a name or a mapping with a 'name' key; got {value!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


#: a number as people write it: 4e6, 4e+6, 1_000_000, 1e-3, .5 (YAML 1.1 reads some of these as strings)
_NUMBER = re.compile(r"[-+]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][-+]?\d+)?")


def _as_int(value: Any) -> tuple[bool, Any]:
    """An int, a whole float (``4e6`` read as 4000000.0) or a number string that is whole."""
    if isinstance(value, bool):
        return False, value
    if isinstance(value, int):
        return True, value
    if isinstance(value, float):
        return (True, int(value)) if value.is_integer() else (False, value)
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        number = decimal.Decimal(value.strip().replace("_", ""))
        if number.adjusted() > 100:  # no int of a googol digits from a typo
            return False, value
        return (True, int(number)) if number == number.to_integral_value() else (False, value)
    return False, value


def _as_float(value: Any) -> tuple[bool, Any]:
    """An int or float, or a number string such as ``1e-3``."""
    if isinstance(value, bool):
        return False, value
    if isinstance(value, (int, float)):
        return True, float(value)
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return True, float(value.strip().replace("_", ""))
    return False, value


def _check_union(value: Any, arms: tuple[Any, ...]) -> tuple[bool, Any]:
    """The first arm that takes the value as it is wins; only then may an arm convert it (``"1e3"`` stays a str)."""
    if value is None and type(None) in arms:
        return True, None
    for arm in arms:
        if arm is not type(None) and check_type(value, arm, convert=False)[0]:
            return check_type(value, arm)
    for arm in arms:
        ok, coerced = check_type(value, arm) if arm is not type(None) else (False, value)
        if ok:
            return True, coerced
    return False, value


def check_type(value: Any, tp: Any, *, convert: bool = True) -> tuple[bool, Any]:
    """Return (ok, coerced value) for the simple types configs use.

    ``convert`` allows the number forms people write (``4e6`` for an int, ``"1e-3"`` for a float).
    """
    if tp is Any or tp is None:
        return True, value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _check_union(value, typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp), value
    if origin in (list, tuple, set, frozenset):
        if not isinstance(value, (list, tuple, set, frozenset)):
            return False, value
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        out = []
        for item in value:
            ok, coerced = check_type(item, args[0], convert=convert) if args else (True, item)
            if not ok:
                return False, value
            out.append(coerced)
        return True, origin(out)
    if origin in (dict, Mapping):
        return isinstance(value, Mapping), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return _as_int(value) if convert else (isinstance(value, int) and not isinstance(value, bool), value)
    if tp is float:
        return _as_float(value) if convert else (isinstance(value, (int, float)) and not isinstance(value, bool), value)
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value


def build_config(config_cls: type, params: Mapping[str, Any] | None, *, context: str) -> Any:
    """Build ``config_cls(**params)`` and turn every problem into one :class:`ConfigError`.

    Args:
        config_cls: an attrs class (the component's own config).
        params: user parameters; unknown keys and wrong types are errors.
        context: how the error names the component, e.g. ``"linear_attention 'gdn'"``.
    """
    params = dict(params or {})
    if not attrs.has(config_cls):
        raise ConfigError(f"{context}: config class {config_cls!r} is not an attrs class")
    attrs.resolve_types(config_cls)
    fields = {f.name: f for f in attrs.fields(config_cls) if f.init}
    problems, clean = [], {}
    for key, value in params.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            problems.append(f"{context} has no field {key!r}.{hint} Known fields: {', '.join(fields) or '(none)'}")
            continue
        if fields[key].converter is not None:  # the field converts (and checks) its own input
            clean[key] = value
            continue
        ok, coerced = check_type(value, fields[key].type)
        if not ok:
            problems.append(f"{context} field {key!r} must be {_type_name(fields[key].type)}; got {value!r}")
        clean[key] = coerced
    missing = [n for n, f in fields.items() if f.default is attrs.NOTHING and n not in params]
    problems += [f"{context} field {n!r} is required" for n in missing]
    if problems:
        raise ConfigError(problems)
    try:
        return config_cls(**clean)
    except ConfigError as exc:
        raise ConfigError([f"{context}: {p}" for p in exc.problems]) from exc
    except (TypeError, ValueError) as exc:
        problems = _validator_problems(config_cls, clean, context) or [f"{context} {_reword(str(exc))}"]
        raise ConfigError(problems) from exc


def _validator_problems(config_cls: type, clean: Mapping[str, Any], context: str) -> list[str]:
    """Run every field's validator on its own, so that all the bad fields are reported, each on one line."""
    try:
        with attrs.validators.disabled():
            inst = config_cls(**clean)
    except Exception:  # noqa: BLE001 - __attrs_post_init__ failed: the caller reports that error
        return []
    problems = []
    for field in attrs.fields(config_cls):
        if field.validator is None:
            continue
        value = getattr(inst, field.name)
        try:
            field.validator(inst, field, value)
        except (TypeError, ValueError) as exc:
            problems.append(f"{context} {_validator_message(exc, field, value)}")
    return problems


#: attrs' ge/gt/le/lt: "'conv_size' must be >= 1: 0"; max_len/min_len: "Length of 'x' must be <= 2: 3"
_COMPARE = re.compile(r"'(?P<name>[^']+)' must be (?P<rule>[<>]=? .+): (?P<got>.*)", re.S)
_LENGTH = re.compile(r"Length of '(?P<name>[^']+)' must be (?P<rule>[<>]=? \d+): (?P<got>\d+)")


def _options(options: Any) -> str:
    if isinstance(options, str):
        return repr(options)
    items = sorted(options, key=repr) if isinstance(options, (set, frozenset)) else list(options)
    return ", ".join(repr(o) for o in items)


def _rule(exc: Exception) -> tuple[str | None, Any]:
    """(rule, the value that failed it) from an attrs validator error; rule is None when not recognised.

    The value is the member for ``deep_iterable``; it is the string attrs printed for ge/gt/le/lt.
    """
    args, msg = exc.args, str(exc.args[0]) if exc.args else ""
    if len(args) >= 4 and isinstance(args[1], attrs.Attribute):
        extra, value = args[2], args[-1]
        if isinstance(extra, re.Pattern):
            return f"match the regular expression {extra.pattern!r}", value
        if isinstance(exc, TypeError) and isinstance(extra, (type, tuple)):
            kinds = extra if isinstance(extra, tuple) else (extra,)
            return "be " + " or ".join(getattr(k, "__name__", repr(k)) for k in kinds), value
        if " must be in " in msg:
            return f"be one of {_options(extra)}", value
        return None, value
    for pattern, verb in ((_COMPARE, "be"), (_LENGTH, "have a length")):
        match = pattern.fullmatch(msg)
        if match:
            return f"{verb} {match['rule']}", _Printed(match["got"])
    return None, None


@attrs.frozen
class _Printed:
    """A value as attrs printed it (str(value)), for validators that give no value object."""

    text: str


def _is_whole(checked: Any, value: Any) -> bool:
    return str(value) == checked.text if isinstance(checked, _Printed) else checked is value


def _walk(validator: Any) -> Iterator[Any]:
    """The validator and those it wraps (and_, optional, deep_iterable)."""
    yield validator
    for inner in (*getattr(validator, "_validators", ()), getattr(validator, "validator", None)):
        if inner is not None:
            yield from _walk(inner)


def _validator_message(exc: Exception, field: attrs.Attribute, value: Any) -> str:
    """Reword an attrs validator error as ``field 'x' must <rule>; got <value!r>``."""
    rule, checked = _rule(exc)
    if rule is None:
        return _reword(str(exc), field.name, value)
    deep = any(type(v).__name__ == "_DeepIterable" for v in _walk(field.validator))
    if deep and not _is_whole(checked, value):
        rule = "hold only items that " + ("are " + rule[3:] if rule.startswith("be ") else rule)
    elif type(field.validator).__name__ == "_OptionalValidator":
        rule += " or None" if rule.startswith("be ") else ", or be None"
    return f"field {field.name!r} must {rule}; got {value!r}"


def _reword(msg: str, name: str | None = None, value: Any = attrs.NOTHING) -> str:
    """A message a validator wrote itself: ``'x' must ...: got`` becomes ``field 'x' must ...; got ...``."""
    if msg.startswith("'") and ": " in msg and " must " in msg:
        head, got = msg.rsplit(": ", 1)
        return f"field {head}; got {got}"
    if name is None:
        return msg
    return f"field {name!r} must pass its validator ({msg.rstrip('.')}); got {value!r}"


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-friendly dict of an attrs config (tuples become lists)."""
    return attrs.asdict(config, recurse=True, value_serializer=lambda _i, _f, v: list(v) if isinstance(v, tuple) else v)
