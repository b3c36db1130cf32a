"""RULER through lm-eval: synthetic subtasks offline, essay haystacks from a local directory, QA online.

lm-eval's RULER tasks build their documents in a ``custom_dataset`` function that loads a tokenizer
from a path, always makes 500 samples per length and fetches the Paul Graham essays from the hub.
Here each task keeps lm-eval's prompt, target, generation settings and scoring (its YAML config),
and only its ``custom_dataset`` is replaced by one that calls lm-eval's own sample generators with
the in-memory tokenizer, ``limit`` samples per length and, for essay haystacks, a local directory.
The QA subtasks (SQuAD, HotpotQA) keep lm-eval's loader, which needs the network and a tokenizer path.

lm-eval's generators loop forever (``ruler_vt``) or leave an empty answer list that divides by zero
in scoring (``ruler_cwe``) when the smallest prompt does not fit the length; :func:`check_lengths`
measures that smallest prompt with the tokenizer first and fails fast.
"""
from __future__ import annotations

import contextlib
import functools
import io
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hybridize.errors import ConfigError

#: niah task -> (haystack, needle key type, needle value type, extra generate_samples args), as lm-eval's niah_utils sets them
NIAH: dict[str, tuple[str, str, str, dict[str, int]]] = {
    "niah_single_1": ("repeat", "words", "numbers", {}),
    "niah_single_2": ("essay", "words", "numbers", {}),
    "niah_single_3": ("essay", "words", "uuids", {}),
    "niah_multikey_1": ("essay", "words", "numbers", {"num_needle_k": 4}),
    "niah_multikey_2": ("needle", "words", "numbers", {}),
    "niah_multikey_3": ("needle", "uuids", "uuids", {}),
    "niah_multivalue": ("essay", "words", "numbers", {"num_needle_v": 4}),
    "niah_multiquery": ("essay", "words", "numbers", {"num_needle_q": 4}),
}
OTHER_SYNTHETIC = ("ruler_vt", "ruler_cwe", "ruler_fwe")
QA = ("ruler_qa_squad", "ruler_qa_hotpot")
ESSAY = tuple(t for t, spec in NIAH.items() if spec[0] == "essay")
SUBTASKS = (*NIAH, *OTHER_SYNTHETIC, *QA)
#: generated tokens that lm-eval reserves inside each length, per task family
_GEN_TOKENS = {"ruler_vt": 30, "ruler_cwe": 120, "ruler_fwe": 50}
_MARGIN = 8  # tokens of slack for the random parts of a prompt (variable names, needle values)


def is_ruler(name: str) -> bool:
    return name == "ruler" or name in SUBTASKS


def expand(names: Sequence[str]) -> list[str]:
    """Replace the group name ``ruler`` by its subtasks (order kept, duplicates dropped)."""
    out: list[str] = []
    for n in names:
        for t in (SUBTASKS if n == "ruler" else (n,)):
            if t not in out:
                out.append(t)
    return out


def config_problems(tasks: Sequence[str], *, online: bool, essays_dir: str | None, lengths: Sequence[int]) -> list[str]:
    """Problems that need no model or tokenizer: QA offline, missing essays, bad lengths."""
    problems = []
    ruler = [t for t in tasks if t in SUBTASKS]
    if not ruler:
        return problems
    qa = [t for t in ruler if t in QA]
    if qa and not online:
        problems.append(
            f"field 'tasks' {qa} download SQuAD / HotpotQA and cannot run offline; drop them "
            f"(or the group 'ruler', listing the subtasks you want) or opt in to the network with online: true (--online)"
        )
    essay = [t for t in ruler if t in ESSAY]
    if essay and essays_dir is None and not online:
        problems.append(
            f"field 'tasks' {essay} need the Paul Graham essays: set field 'essays_dir' (--essays) to a "
            f"directory of .txt essays, e.g. ../shared/data/pg_essays, or opt in to the hub copy with online: true"
        )
    if essays_dir is not None and essay:
        path = Path(essays_dir)
        if not path.is_dir() or not any(path.glob("*.txt")):
            problems.append(f"field 'essays_dir' must be a directory of .txt essays; got {essays_dir!r}")
    bad = [n for n in lengths if isinstance(n, bool) or not isinstance(n, int) or n < 1]
    if bad or not lengths:
        problems.append(f"field 'max_seq_lengths' must be a non-empty list of ints >= 1; got {list(lengths)!r}")
    elif "ruler_fwe" in ruler and min(lengths) < 200:
        problems.append(f"field 'max_seq_lengths': ruler_fwe needs max_seq_lengths >= 200 (its coded vocabulary is length // 50 "
                        f"words and the answer takes 3 of them); got {min(lengths)}")
    return problems


# -- lengths that lm-eval's generators cannot fill ------------------------------------------------------
def _ntok(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text).input_ids)


def _vt_minimum(tokenizer: Any) -> tuple[int | None, str]:
    """Smallest length ruler_vt can fill: (None, why) when even its 1-shot example cannot be made."""
    from lm_eval.tasks.ruler import vt_utils

    text, answer = vt_utils.generate_input_output(5, 1, 4, is_icl=True)
    icl_tokens = _ntok(tokenizer, text + f" {answer}") + _GEN_TOKENS["ruler_vt"]
    if icl_tokens + _MARGIN > 500:
        return None, (f"its 1-shot example, made at lm-eval's fixed 500 tokens, takes {icl_tokens} tokens with this tokenizer "
                      f"even with the fewest noise lines, and lm-eval would loop forever")
    with contextlib.redirect_stdout(io.StringIO()):
        icl = vt_utils.sys_vartrack_w_noise_random(tokenizer=tokenizer, num_samples=1, max_seq_length=500, incremental=5)[0]
    example = _ntok(tokenizer, icl["input"] + " " + " ".join(icl["outputs"]) + "\n\n")
    text, answer = vt_utils.generate_input_output(10, 1, 4, is_icl=False)
    need = _ntok(tokenizer, text + f" {answer}") + _GEN_TOKENS["ruler_vt"] + example + _MARGIN
    return need, "a 4-hop chain in 10 noise lines plus the 1-shot example and 30 generated tokens"


def _cwe_minimum(tokenizer: Any, length: int) -> tuple[int, str]:
    from lm_eval.tasks.ruler import cwe_utils

    example, text, answer = cwe_utils.generate_input_output(10, length)
    listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(answer))
    need = _ntok(tokenizer, example + "\n" + text + " " + listing) + _GEN_TOKENS["ruler_cwe"] + _MARGIN
    return need, "10 listed words plus the example and 120 generated tokens"


def check_lengths(tasks: Sequence[str], tokenizer: Any, lengths: Sequence[int]) -> None:
    """Fail fast where lm-eval's generators would hang (vt) or divide by zero (cwe) at these lengths."""
    problems = []
    if "ruler_vt" in tasks:
        need, what = _vt_minimum(tokenizer)
        if need is None:
            problems.append(f"evaluator 'lm-eval' task ruler_vt cannot run with this tokenizer: {what}")
        elif min(lengths) < need:
            problems.append(f"evaluator 'lm-eval' task ruler_vt needs max_seq_lengths >= {need} with this tokenizer ({what}); "
                            f"got {min(lengths)}. lm-eval would loop forever: raise the length or drop ruler_vt")
    if "ruler_cwe" in tasks:
        for n in sorted(set(lengths)):
            need, what = _cwe_minimum(tokenizer, n)
            if n < need:
                problems.append(f"evaluator 'lm-eval' task ruler_cwe needs max_seq_lengths >= {need} with this tokenizer ({what}); "
                                f"got {n}. lm-eval would leave the answer empty and divide by zero: raise the length or drop ruler_cwe")
                break
    if problems:
        raise ConfigError(problems)


# -- documents ---------------------------------------------------------------------------------------
@functools.cache
def essay_haystack(essays_dir: str) -> list[str]:
    """The words of every ``*.txt`` essay in a directory, in file-name order (lm-eval's haystack shape)."""
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(Path(essays_dir).glob("*.txt"))]
    return re.sub(r"\s+", " ", " ".join(texts)).strip().split(" ")


def sentence_splitter() -> str:
    """Make lm-eval's essay sentence splitter work offline; return which splitter runs.

    lm-eval splits essays with nltk's pretrained ``punkt_tab`` data, which it downloads on import.
    Without that data, nltk's Punkt tokenizer with default (untrained) parameters is used instead.
    """
    import nltk
    from lm_eval.tasks.ruler import prepare_niah

    try:
        nltk.data.find("tokenizers/punkt_tab")
        return "nltk punkt_tab"
    except LookupError:
        from nltk.tokenize.punkt import PunktSentenceTokenizer

        prepare_niah.cached_sent_tokenize = functools.lru_cache(maxsize=1024)(PunktSentenceTokenizer().tokenize)
        return "nltk Punkt, untrained (punkt_tab data not installed)"


def _haystack(kind: str, essays_dir: str | None) -> Any:
    from lm_eval.tasks.ruler import prepare_niah

    if kind == "essay" and essays_dir is not None:
        return essay_haystack(str(Path(essays_dir).resolve()))
    return prepare_niah.get_haystack(type_haystack=kind)  # essay: the hub copy (online only)


def samples(name: str, tokenizer: Any, length: int, n: int, essays_dir: str | None) -> list[dict]:
    """``n`` documents of one synthetic subtask at one length, from lm-eval's generators (lm-eval's document
    schema: ``input``, ``outputs``, ``gen_prefix``, ``length``, ...; the essays from ``essays_dir``, else the hub).

    Call it inside :func:`hybridize.plugins.evals.network.network` (lm-eval's RULER module downloads nltk data
    on import otherwise) and after :func:`sentence_splitter` for the essay subtasks, as the evaluator does."""
    if name in NIAH:
        from lm_eval.tasks.ruler import niah_utils, prepare_niah

        kind, key_type, value_type, extra = NIAH[name]
        return prepare_niah.generate_samples(
            _haystack(kind, essays_dir), TOKENIZER=tokenizer, max_seq_length=length, template=niah_utils.TEMPLATE,
            type_haystack=kind, type_needle_k=key_type, type_needle_v=value_type, num_samples=n, **extra,
        )
    if name == "ruler_vt":
        from lm_eval.tasks.ruler import vt_utils

        with contextlib.redirect_stdout(io.StringIO()):  # it prints every search step
            icl = vt_utils.sys_vartrack_w_noise_random(tokenizer=tokenizer, num_samples=1, max_seq_length=500, incremental=5)[0]
            return vt_utils.sys_vartrack_w_noise_random(tokenizer=tokenizer, num_samples=n, max_seq_length=length, icl_example=icl)
    if name == "ruler_cwe":
        from lm_eval.tasks.ruler import cwe_utils

        return cwe_utils.sys_word_pair_random(num_samples=n, max_seq_length=length, tokenizer=tokenizer)
    if name == "ruler_fwe":
        from lm_eval.tasks.ruler import fwe_utils

        return fwe_utils.sys_kwext(tokenizer=tokenizer, max_seq_length=length, num_samples=n)
    raise KeyError(name)


def dataset_fn(name: str, tokenizer: Any, lengths: Sequence[int], n: int, essays_dir: str | None) -> Callable[..., dict]:
    """The ``custom_dataset`` of one task: ``n`` samples per length, in lm-eval's document schema."""

    def build(**_metadata: Any) -> dict:
        import datasets

        rows = [row for length in lengths for row in samples(name, tokenizer, length, n, essays_dir)]
        return {"test": datasets.Dataset.from_list(rows, split=datasets.Split.TEST)}

    return build


def task_config(
    task_manager: Any, name: str, *, tokenizer: Any, lengths: Sequence[int], n: int, essays_dir: str | None,
    tokenizer_path: Callable[[], str],
) -> dict[str, Any]:
    """lm-eval's config of one RULER subtask with our documents and one metric per requested length."""
    from lm_eval.tasks._yaml_loader import load_yaml
    from lm_eval.tasks.ruler.common_utils import aggregate_metrics

    cfg = dict(load_yaml(task_manager.task_index[name].yaml_path, resolve_func=True))
    cfg["metric_list"] = [{"metric": str(k), "aggregation": aggregate_metrics, "higher_is_better": True} for k in lengths]
    cfg["metadata"] = {**(cfg.get("metadata") or {}), "max_seq_lengths": list(lengths)}
    if name in QA:  # lm-eval's own loader: the hub data sets and a tokenizer path
        cfg["metadata"]["tokenizer"] = tokenizer_path()
    else:
        cfg["custom_dataset"] = dataset_fn(name, tokenizer, lengths, n, essays_dir)
    return cfg
