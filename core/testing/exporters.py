"""Conformance of an export format (an ``exporter`` plugin), on tiny random hybrids; CPU, seconds.

``tests/unit/test_export.py`` runs :func:`check_exporter` on every registered exporter and every supported
teacher family, so a third-party format is tested with no new code::

    from hybridize.testing.exporters import check_exporter, exportable_hybrid
    check_exporter(get_plugin_manager().registry("exporter")["my-format"], exportable_hybrid("qwen3"))

What it checks (the rules of :mod:`hybridize.export`): ``summary`` is one line; ``check`` is a deterministic
:class:`~hybridize.export.ExportCheck` computed from the config alone; a conversion reads or drops every
tensor of the hybrid and drops one only where ``check`` reported a difference; the converted model is in
eval mode, of a class ``AutoModelForCausalLM`` builds from its own config, and survives ``save_pretrained`` /
``from_pretrained`` with no missing or unused weight and the same logits; an export ``check`` calls exact has
the hybrid's logits (float32, within 1e-4 of the largest logit) and greedy tokens.
"""
from __future__ import annotations

import tempfile
from typing import Any

import torch

from hybridize.export import Converted, ExportCheck
from hybridize.model.export import check_converted, fixed_prompts, parity


def exportable_hybrid(family: str, *, variant: str = "gdn", softmax: tuple[int, ...] = (1,), seed: int = 0) -> Any:
    """A tiny GDN hybrid (4 layers) of a random teacher, every weight away from its init; GDN built without the
    teacher's q/k norms and with its ``rms_norm_eps``, the options a qwen3_5 export needs to be exact."""
    from hybridize.model.surgery import build_student
    from hybridize.testing.models import tiny_model

    teacher = tiny_model(family, n_layer=4, seed=seed)
    params = {"qk_norm": False, "norm_eps": teacher.config.rms_norm_eps} if variant == "gdn" else {}
    hybrid = build_student(teacher, list(softmax), variant, params).eval()
    gen = torch.Generator().manual_seed(seed + 11)
    with torch.no_grad():
        for p in hybrid.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return hybrid


def _reloads(converted: Any, name: str) -> None:
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, converted.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    with tempfile.TemporaryDirectory() as tmp:
        converted.save_pretrained(tmp)
        again, info = AutoModelForCausalLM.from_pretrained(tmp, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad or type(again) is not type(converted):
        raise AssertionError(f"{name}: the converted model does not reload cleanly ({type(again).__name__}, {bad})")
    with torch.no_grad():
        err = float((again.eval()(ids).logits - converted(ids).logits).abs().max())
    if err > 1e-6:
        raise AssertionError(f"{name}: the reloaded model's logits differ by {err:.3g}")


def check_exporter(entry: Any, hybrid: Any) -> str:
    """Run every rule on ``hybrid``; return ``unavailable``, ``refused``, ``exact`` or ``approximate``."""
    from transformers import AutoModelForCausalLM

    name, exporter = entry.name, entry.factory(entry.build_config())
    if not isinstance(exporter.summary, str) or not exporter.summary.strip() or "\n" in exporter.summary:
        raise AssertionError(f"{name}: summary must be one non-empty line; got {exporter.summary!r}")
    if exporter.unavailable() is not None:
        return "unavailable"
    check = exporter.check(hybrid.config)
    if not isinstance(check, ExportCheck) or exporter.check(hybrid.config) != check:
        raise AssertionError(f"{name}: check must return the same ExportCheck for the same config; got {check!r}")
    if check.refusals:
        return "refused"
    converted = exporter.convert(hybrid)
    if not isinstance(converted, Converted) or converted.model.training:
        raise AssertionError(f"{name}: convert must return a Converted whose model is in eval mode; got {converted!r}")
    check_converted(name, hybrid, converted, check.differences)
    built = type(AutoModelForCausalLM.from_config(converted.model.config))
    if built is not type(converted.model):
        raise AssertionError(f"{name}: AutoModelForCausalLM builds {built.__name__} from the converted config, "
                             f"not {type(converted.model).__name__}")
    _reloads(converted.model, name)
    if check.exact:
        p = parity(hybrid, converted.model, fixed_prompts(None, hybrid.config.vocab_size))
        if p["max_abs_logit_diff"] > 1e-4 * max(1.0, p["max_abs_logit"]) or p["greedy_agreement"] < 1.0:
            raise AssertionError(f"{name}: check calls the export exact but {p}")
        return "exact"
    return "approximate"
