"""YAML as configs read it: one-line errors with the source, line and column; duplicate keys refused.

Every YAML text a user gives (the config file, a ``--set`` value, an ``--evaluator`` item) goes through
:func:`parse_yaml`, so they all fail the same way: ``<source> is not valid YAML at line L, column C: ...``.
A key given twice in one mapping is an error naming both lines, never "the last one wins".
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from hybridize.errors import ConfigError

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _DuplicateKey(yaml.YAMLError):
    """Raised inside the loader; :func:`parse_yaml` turns it into a :class:`ConfigError`."""

    def __init__(self, key: Any, first: yaml.Mark, second: yaml.Mark):
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (merge keys ``<<`` still override)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: SafeLoader reports it itself
                continue
            if first is not key_node.start_mark:
                raise _DuplicateKey(key, first, key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _position(mark: yaml.Mark | None) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "an unknown position"


def _syntax_message(exc: yaml.YAMLError, source: str) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).replace("\n", " ")
    if "'\\t'" in problem:
        return f"{source} is not valid YAML at {_position(mark)}: a tab character; YAML indents with spaces, so replace the tab with spaces"
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    if context and context_mark is not None and context_mark is not mark:
        problem += f" ({context} started at {_position(context_mark)})"
    elif context:
        problem += f" ({context})"
    return f"{source} is not valid YAML at {_position(mark)}: {problem}"


def parse_yaml(text: str, *, source: str) -> Any:
    """Parse YAML text; any problem is one :class:`ConfigError` line naming ``source``, line and column.

    Args:
        text: the YAML text.
        source: how the message names it, e.g. ``"config file 'run.yaml'"`` or ``"--set 'a.b=[1'"``.
    """
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader
    except _DuplicateKey as exc:
        raise ConfigError(
            f"{source}: key {exc.key!r} is given twice in one mapping, at {_position(exc.first)} and "
            f"{_position(exc.second)}; keep one (YAML would silently use the last)"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(_syntax_message(exc, source)) from None


def read_yaml_file(path: str | Path) -> Any:
    """Read and parse a YAML config file (``None`` for an empty file), with one-line errors."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory; give the path of a YAML run config file")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {exc.start}); give a YAML file") from None
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    return parse_yaml(text, source=f"config file {str(path)!r}")
