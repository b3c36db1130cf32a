"""Merge `hybridize eval --out` results into one table (one column per model) and one JSON file.

    python bench/eval_table.py teacher=runs/eval_teacher/eval.json hybrid=runs/eval_hybrid/eval.json \\
        --out bench/results/ruler_stories260k.json --note "command and machine"
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from hybridize.evaluate import markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", metavar="LABEL=EVAL_JSON")
    parser.add_argument("--out", required=True, help="combined JSON")
    parser.add_argument("--note", default="", help="free text stored with the results (command, machine)")
    args = parser.parse_args()
    runs = {}
    for item in args.results:
        label, _, path = item.partition("=")
        runs[label] = json.loads(Path(path).read_text())
    table = markdown_table(runs)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"note": args.note, "table": table, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
