"""bench/recall_data.py and bench/recall_teacher.py (issue 20) on CPU: the RULER-style generator's documents hold
their needles and answers, follow lm-eval's prompts, fit their budgets, repeat under a seed, tokenize the same
split or joined, and fill compare blocks exactly; a tiny teacher of the same recipe trains (its loss falls), is
measured through lm-eval with its per-layer ablation, and survives the bf16 pieces and ``join``.
(The GPU run: ``bench/recall_compare.sh``, bench/README.md.)"""
from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import recall_data as rd  # noqa: E402

pytestmark = pytest.mark.skipif(not (rd.ESSAYS.is_dir() and rd.STORIES.is_file()),
                                reason="needs ../shared/data (pg_essays, tinystories_val.txt)")
NIAH = tuple(rd.NIAH_KINDS)


@pytest.fixture(scope="module")
def gen():
    strings = rd.ruler_strings()
    texts = rd.story_paragraphs()[:400] + rd.essay_paragraphs()
    tok = rd.build_tokenizer(rd.tokenizer_corpus(strings, texts, n_prompts=300), vocab_size=1024)
    data, held = rd.load(tok)
    return tok, data, held


@pytest.mark.parametrize("kind", rd.KINDS[:-1])
def test_documents_hold_their_needles_and_answers(gen, kind):
    tok, data, _ = gen
    rng = random.Random(1)
    for budget in (data.least_tokens(kind) + 40, 1024):
        doc = data.document(rng, kind, budget)
        assert doc.ids[0] == tok.bos_token_id and len(doc.ids) + len(doc.answer_ids) <= budget
        assert tok.decode(doc.answer_ids) == doc.answer
        for needle in doc.needles:  # every needle is in the haystack that the prompt shows
            assert needle.strip() in doc.context
        for ans in doc.answers:  # every reference is retrievable from the prompt and is what the teacher learns to say
            assert ans in doc.answer
            assert any(ans in n for n in doc.needles) and ans in doc.context
        if kind != "vt":
            for ans in doc.answers:  # the needle holding it names a key that the question asks for
                key = re.search(r"for (\S+) is: " + ans, doc.context).group(1)
                assert key in doc.context.split("\n")[-1]
        questions = doc.tail_text.split("\n")[1:]
        assert len(questions) == len(doc.tail) == len(doc.tail_answers)
        for q, ans in zip(questions, doc.tail_answers):  # each later question asks for another needle of the haystack
            key = re.search(r"for (\S+) is: " + ans + r"\.", doc.context).group(1)
            assert q.startswith(f"What is the special magic number for {key} mentioned") and q.endswith(f" is {ans}.")
    if kind in ("multikey_essay", "multikey_needle"):
        assert doc.tail  # several needles: more than one question


def test_prompts_follow_lm_eval(gen):
    """Our single_repeat / multikey_needle prompts and lm-eval's niah_single_1 / niah_multikey_2 prompts share every
    line but the haystack, once the keys and values are blanked out."""
    import recall_eval as re_

    tok, data, _ = gen
    theirs = re_.ruler_samples(tok, seq=512, n=1, essays=str(rd.ESSAYS), seed=0)
    blank = lambda text: re.sub(r"\d{7}", "V", re.sub(r"for [\w\-]+(?= is| mentioned)", "for K", text))  # noqa: E731
    for kind, task in (("single_repeat", "niah_single_1"), ("multikey_needle", "niah_multikey_2")):
        ours = blank(data.document(random.Random(0), kind, 400).context).split("\n")
        ref = blank(re_._request(theirs[task][0])).split("\n")
        assert ours[0] == ref[0] and ours[-1] == ref[-1]
        assert set(ours[1:-1]) == set(ref[1:-1])  # the same haystack lines and needle sentence


def test_lengths_near_the_budget_and_split_tokenization(gen):
    tok, data, _ = gen
    rng = random.Random(2)
    for kind in NIAH + ("vt",):
        doc = data.document(rng, kind, 1500)
        assert 1200 <= doc.n_tokens <= 1500, kind
        if kind != "vt":  # the context ends before the answer's space, so both tokenize alike joined or split
            joint = tok(doc.context + doc.answer + doc.tail_text, add_special_tokens=False)["input_ids"]
            assert joint == list(doc.ids[1:]) + list(doc.answer_ids) + [t for q, a in doc.tail for t in q + a]


def test_rows_are_deterministic_and_flag_the_answers(gen):
    tok, data, _ = gen
    a_ids, a_flags = data.batch(7, 512, 6)
    b_ids, b_flags = data.batch(7, 512, 6)
    c_ids, _ = data.batch(8, 512, 6)
    assert (a_ids == b_ids).all() and (a_flags == b_flags).all() and not (a_ids == c_ids).all()
    assert a_ids.shape == (6, 512)
    docs = lambda ids, flags: int(((ids == tok.eos_token_id) & (flags == 1)).sum())  # noqa: E731 - one flagged EOS per document
    assert docs(*data.batch(7, 512, 24, doc_max=160)) > docs(*data.batch(7, 512, 24))  # short documents: several per row
    for ids, flags in zip(a_ids, a_flags):
        if flags.any():  # a retrieval row: BOS first; the answers (and the EOS right after lm-eval's one) flagged, nothing else
            assert ids[0] == tok.bos_token_id
            text = tok.decode(ids[flags.astype(bool)].tolist(), skip_special_tokens=False)
            assert re.fullmatch(r"(?:(?: [\d, and]+\.|[A-Z]{5}(?: [A-Z]{5})*)(?:</s>)?)+", text), text
            for p in (ids == tok.eos_token_id).nonzero()[0]:
                assert not flags[p] or flags[p - 1]  # a flagged EOS closes an answer


def test_corpus_rows_fill_compare_blocks_exactly(gen, tmp_path):
    from hybridize.training.data import DataConfig, prepare_data

    tok, data, _ = gen
    summary = rd.write_corpus(data, tmp_path / "c.jsonl", tokens=8 * 512, T=512, seed=3)
    packed = prepare_data(DataConfig(train=str(tmp_path / "c.jsonl"), seq_len=512, heldout_fraction=0.1), tok, seed=0)
    blocks = torch.cat([packed.train, packed.heldout])
    assert summary["rows"] == 8 and packed.n_tokens == 8 * 512 and blocks.shape == (8, 512)
    assert (blocks[:, 0] == tok.bos_token_id).all()  # every row starts a block, as in training
    texts = [tok.decode(b) for b in blocks]
    assert sum("special magic" in t or "VAR " in t for t in texts) >= 4


def test_tiny_teacher_trains_is_measured_and_joins(gen, tmp_path):
    import recall_teacher as rt

    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="--hidden"):
        rt.cmd_train(rt.parse(["--preset", "tiny", "--steps", "2", "--heads", "3", "--out", str(out)]))
    assert not out.exists()  # refused before anything was written
    rt.main(["--device", "cpu", "--preset", "tiny", "--steps", "12", "--log-every", "0", "--eval-limit", "2",
             "--heldout-blocks", "2", "--out", str(out)])
    rec = json.loads((out / "recall_teacher.json").read_text())
    log = rec["train"]["log"]
    assert rec["train"]["steps"] == 12 and log[-1]["loss"] < log[0]["loss"] - 0.2
    assert set(rec["eval"]["ruler"]["metrics"]) == set(rt.TASKS)
    assert all(0.0 <= v <= 1.0 for v in rec["eval"]["ruler"]["metrics"].values())
    ab = rec["eval"]["ablation"]
    assert [r["layer"] for r in ab["layers"]] == [0, 1] and all(r["heldout_loss"] > 0 for r in ab["layers"])
    assert "| 1 |" in (out / "recall_teacher.md").read_text() and (out / "recall_ablation.png").stat().st_size > 0
    joined = rt.join(out, tmp_path / "joined")
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(out / "teacher").state_dict()
    b = AutoModelForCausalLM.from_pretrained(joined).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bf16 pieces hold the teacher exactly
    with pytest.raises(SystemExit, match="not empty"):
        rt.join(out, joined)


def test_curriculum_and_flops():
    import recall_teacher as rt

    assert rt.lengths(2048) == [(0.3, 512, 192), (0.4, 512, 512), (0.5, 1024, 1024), (1.0, 2048, 2048)]
    assert rt.lengths(512) == [(0.3, 512, 192), (1.0, 512, 512)]
    assert [rt.phase(p, 2048) for p in (0.0, 0.35, 0.45, 0.6, 0.99)] == [
        (512, 192, True), (512, 512, False), (1024, 1024, False), (2048, 2048, False), (2048, 2048, False)]

    class Tok:
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

        def __len__(self):
            return 4096

    model = rt.build_model(rt.parse(["--out", "/nonexistent", "--steps", "1"]), Tok())
    weights = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n) + 4096 * 384
    assert rt.flops_per_token(model, 2048) == 6 * weights + 6 * 12 * 2048 * 384  # 6N + causal attention
    assert 20e6 < sum(p.numel() for p in model.parameters()) < 21e6  # 41 MB in bf16: three 16 MiB pieces
