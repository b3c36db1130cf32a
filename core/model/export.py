"""The export engine's model-level steps: the fixed prompt set, parity of a converted model, the written directory.

:func:`parity` compares a converted model with the hybrid it came from on :func:`fixed_prompts`: the largest
|logit difference|, the mean KL(hybrid || converted) per token, and greedy decoding (cache on) of
:data:`NEW_TOKENS` tokens from each prompt. :func:`write_export` writes the converted model, the hybrid's
tokenizer and generation config to a temporary directory, reloads it from there with ``AutoModelForCausalLM``
(refusing any missing, unused or mis-shaped weight), measures the parity of what was reloaded, writes it to
:data:`REPORT`, then a manifest, and renames the directory into place.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hybridize.errors import ExportError

#: the fixed prompts of every parity report (a model without a tokenizer gets seeded random ids instead)
PROMPTS = (
    "Once upon a time, there was a little",
    "The capital of France is",
    "def add(a, b):\n    return a +",
    "1, 2, 3, 4, 5,",
)
NEW_TOKENS = 16
REPORT = "export_report.json"


def fixed_prompts(tokenizer: Any, vocab_size: int) -> list[torch.Tensor]:
    """The prompt set as (1, T) token ids: :data:`PROMPTS` tokenized, or 4 seeded random prompts of 24 ids."""
    if tokenizer is None:
        gen = torch.Generator().manual_seed(0)
        return [torch.randint(0, vocab_size, (1, 24), generator=gen) for _ in PROMPTS]
    return [tokenizer(p, return_tensors="pt").input_ids[:, :64] for p in PROMPTS]


def _greedy(model: Any, ids: torch.Tensor, n: int) -> torch.Tensor:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         use_cache=True, pad_token_id=0, eos_token_id=None)
    return out[0, ids.shape[1]:]


@torch.no_grad()
def parity(source: Any, target: Any, prompts: list[torch.Tensor], *, new_tokens: int = NEW_TOKENS) -> dict[str, Any]:
    """How far ``target`` is from ``source`` on ``prompts`` (both in eval mode, on their own device and dtype)."""
    device = next(source.parameters()).device
    worst, largest, kl, tokens, agree, same = 0.0, 0.0, 0.0, 0, 0, 0
    for ids in prompts:
        ids = ids.to(device)
        a = source(ids, use_cache=False).logits.double()[0]  # (T, V); float64: the KL of near-equal logits
        b = target(ids, use_cache=False).logits.double()[0]
        worst, largest = max(worst, float((a - b).abs().max())), max(largest, float(a.abs().max()))
        logp, logq = F.log_softmax(a, -1), F.log_softmax(b, -1)
        kl += float((logp.exp() * (logp - logq)).sum())
        tokens += ids.shape[1]
        ga, gb = _greedy(source, ids, new_tokens), _greedy(target, ids, new_tokens)
        agree += int((ga == gb).sum())
        same += int(torch.equal(ga, gb))
    return {
        "max_abs_logit_diff": worst, "max_abs_logit": largest, "kl": kl / max(tokens, 1),
        "greedy_agreement": agree / (new_tokens * len(prompts)), "greedy_identical_prompts": same,
        "prompts": len(prompts), "prompt_tokens": tokens, "new_tokens": new_tokens,
        "dtype": str(next(source.parameters()).dtype).removeprefix("torch."),
    }


def describe(p: dict[str, Any]) -> str:
    """One line of a parity record."""
    return (f"max |logit difference| {p['max_abs_logit_diff']:.3g} (logits up to {p['max_abs_logit']:.3g}), KL "
            f"{p['kl']:.3g} per token, greedy agreement {p['greedy_agreement']:.1%} of {p['new_tokens']} tokens x "
            f"{p['prompts']} prompts ({p['greedy_identical_prompts']} identical), {p['dtype']}")


def check_converted(fmt: str, source: Any, converted: Any, differences: tuple[str, ...]) -> None:
    """Every tensor of the hybrid is converted or dropped, and one is dropped only where the check said so.

    Raises:
        ExportError: naming the exporter and the first tensor concerned (the exporter plugin is at fault).
    """
    names = set(source.state_dict())
    unused = sorted(names - converted.read - converted.dropped)
    if unused:
        raise ExportError(f"exporter {fmt!r} left {len(unused)} tensor(s) of the hybrid neither converted nor dropped, "
                          f"the first {unused[0]!r}; the exporter plugin is incomplete, nothing was written")
    if converted.dropped and not differences:
        raise ExportError(f"exporter {fmt!r} dropped {sorted(converted.dropped)[:3]} although its check found the "
                          "export exact; the exporter plugin is inconsistent, nothing was written")


def _reload(tmp: Path) -> Any:
    """The written directory loaded back with ``AutoModelForCausalLM``; any missing, unused or mis-shaped weight is an error."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(tmp, output_loading_info=True, dtype="auto")
    bad = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ExportError(f"the exported directory does not load cleanly with AutoModelForCausalLM: {bad}; nothing was written")
    return model.eval()


def write_export(model: Any, out: Path, *, source: Any, tokenizer: Any, prompts: list[torch.Tensor],
                 finish: Callable[[dict[str, Any], Any], dict[str, Any]]) -> dict[str, Any]:
    """Write ``model`` (+ tokenizer, + the source's generation config) to ``out`` atomically; return the report.

    ``finish(parity_of_the_reloaded_directory, reloaded_model)`` builds the report written to :data:`REPORT`.
    """
    from hybridize.atomic_io import atomic_dir, write_json, write_manifest

    report: dict[str, Any] = {}
    if getattr(source, "generation_config", None) is not None:
        model.generation_config = copy.deepcopy(source.generation_config)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    def verify(tmp: Path) -> None:  # a failure here leaves nothing behind (atomic_dir removes its temporary dir)
        reloaded = _reload(tmp).to(next(source.parameters()).device)
        report.update(finish(parity(source, reloaded, prompts), reloaded))
        write_json(tmp / REPORT, report)
        write_manifest(tmp)

    needed = sum(t.nelement() * t.element_size() for t in model.state_dict().values())
    atomic_dir(out, write, needed=needed, before_rename=verify)
    return report
