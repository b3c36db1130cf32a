"""Parity of ``hybridize export --format qwen3_5`` per teacher family, before and after ``--heal-tokens``.

    python bench/export_parity.py --hybrid runs/stories260k_gdn/model --out bench/results/export_parity.json

For each family (Llama, Qwen2, Qwen3, Mistral) a GDN hybrid of a tiny random teacher (4 layers, d=32, layer 1
softmax; GDN with qk_norm false and the teacher's rms_norm_eps, as an exact Qwen3 export needs) is exported,
healed where the layout is approximate on a text file tokenized by the tiny character tokenizer; each
``--hybrid DIR`` (a saved hybrid of a real teacher) is exported too. Prints a markdown table and writes the
export reports as JSON. CPU is enough.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"


def _row(label: str, report: dict) -> dict:
    heal, after = report["heal"], report["parity"]
    before = report["parity_before_heal"] or after
    return {"hybrid": label, "exact": report["exact"], "differences": len(report["differences"]),
            "max_logit_diff_before": before["max_abs_logit_diff"], "kl_before": before["kl"],
            "greedy_before": before["greedy_agreement"], "max_logit_diff": after["max_abs_logit_diff"], "kl": after["kl"],
            "greedy": after["greedy_agreement"], "heal_tokens": heal["tokens"] if heal else 0,
            "heldout_kl_before": heal["heldout_kl_before"] if heal else None,
            "heldout_kl_after": heal["heldout_kl_after"] if heal else None}


def _export(path: Path, out: Path, data: str, tokens: int, seq_len: int) -> dict:
    """Export with healing; an exact export skips the healing (``report["heal"]`` is None)."""
    from hybridize.recipes.export import ExportOptions, export

    return export(path, out, ExportOptions(heal_tokens=tokens, data=data, seq_len=seq_len, progress=False, device="cpu"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hybrid", action="append", default=[], help="a saved hybrid of a real teacher (repeatable)")
    ap.add_argument("--data", default=str(SHARED / "data" / "tinystories_val.txt"))
    ap.add_argument("--heal-tokens", type=int, default=200_000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    from hybridize.model.hybrid import save_hybrid
    from hybridize.testing.exporters import exportable_hybrid
    from hybridize.testing.models import FAMILIES, tiny_tokenizer

    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and several contend on a shared CPU
    rows, reports = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in FAMILIES:
            path = save_hybrid(exportable_hybrid(family), Path(tmp) / family, tiny_tokenizer())
            reports[f"tiny-{family}"] = _export(path, Path(tmp) / f"{family}-out", args.data, args.heal_tokens, 128)
        for i, hybrid in enumerate(args.hybrid):
            reports[hybrid] = _export(Path(hybrid), Path(tmp) / f"real{i}-out", args.data, args.heal_tokens, 128)
    rows = [_row(label, r) for label, r in reports.items()]
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "reports": reports}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
