"""What ``hybridize plugins`` lists: plugins, their versions and hooks, every registered component by kind."""
from __future__ import annotations

from typing import Any

import attrs

from hybridize.registry.entries import KINDS


def _config_fields(config_cls: type) -> dict[str, Any]:
    out = {}
    for f in attrs.fields(config_cls):
        default = f.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = default.factory()
        out[f.name] = None if default is attrs.NOTHING else default
    return out


def plugins_payload(pm: Any) -> dict[str, Any]:
    """Every plugin and every registered component by kind (with its params' defaults), as ``hybridize plugins --json``."""
    components = {}
    for kind in KINDS:
        rows = []
        for name, entry in sorted(pm.registry(kind).items()):
            row = entry.to_json()
            row["params"] = _config_fields(entry.config_cls)
            rows.append(row)
        components[kind] = rows
    from hybridize.selection.contract import ChoiceConfig

    return {"plugins": pm.plugin_info(), "components": components, "selector_distance_params": _config_fields(ChoiceConfig)}


def print_plugins(payload: dict[str, Any]) -> None:
    """:func:`plugins_payload` as the text of ``hybridize plugins``."""
    print("Plugins:")
    for p in payload["plugins"]:
        dist = f"{p['distribution']} {p['version']}" if p["distribution"] else "(not from a distribution)"
        print(f"  {p['name']:<24} {dist:<28} hooks: {', '.join(p['hooks']) or '-'}")
    for kind, rows in payload["components"].items():
        print(f"\n{kind} ({len(rows)}):")
        for r in rows:
            dist = f"{r['distribution']} {r['version']}" if r["distribution"] else "-"
            params = ", ".join(f"{k}={v!r}" for k, v in r["params"].items())
            print(f"  {r['name']:<20} {r['module']:<40} {dist}")
            if params:
                print(f"  {'':<20} params: {params}")
        if kind == "selector" and payload.get("selector_distance_params"):
            extra = ", ".join(f"{k}={v!r}" for k, v in payload["selector_distance_params"].items())
            print(f"  every selector also takes the distance options {extra}")
