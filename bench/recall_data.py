"""RULER-style retrieval documents and the tokenizer of the recall teacher (bench/recall_teacher.py, issue 20).

A teacher learns a retrieval skill that transfers to the project's RULER evaluation only if it trains on the
prompts that evaluation shows it. So the prompt strings are read from lm-eval at run time (its niah template,
needle sentence, repeat haystack, depths, the adjective and noun lists its keys are made of, the variable-tracking
template; :func:`ruler_strings`), and the documents are assembled the way lm-eval's generators assemble theirs
(needles in a repeated-sentence, essay or needle haystack at sampled depths, one or several keys, values and
queries), from a seeded ``random.Random`` so that a seed fixes every document. A document is the lm-eval context
(the prompt, then its ``gen_prefix``) plus the answer the teacher should generate (`` 1234567.`` and EOS), with
the answer's token positions marked for the loss.

Document kinds (the lm-eval task each one mimics): ``single_repeat`` (niah_single_1), ``single_essay``
(niah_single_2), ``multikey_essay`` (niah_multikey_1: four keys), ``multikey_needle`` (niah_multikey_2: a haystack
of distractor needles), ``multivalue`` (niah_multivalue: four values of one key), ``multiquery`` (niah_multiquery:
four keys asked at once), ``vt`` (ruler_vt without its 1-shot example: chains of variable assignments), and
``text`` (TinyStories and essay paragraphs, plain language modelling).

A training row of T tokens is one retrieval document from position 0 (BOS first, as in the evaluation) followed by
natural-text documents up to T tokens, or natural text only. :meth:`RecallData.corpus_rows` writes the same rows
as text documents whose tokens (with hybridize's BOS / EOS separators) fill exactly T, so that
``hybridize compare`` on that corpus with ``data.seq_len: T`` packs each row into one block.

The tokenizer (:func:`build_tokenizer`) is a byte-level BPE trained here, offline, on the essays, TinyStories and
RULER-style strings: single digits (a 7-digit value is 7 tokens, copied one by one), BOS added by default as
lm-eval's HFLM expects. stories260K's 512-token vocabulary would spell "special" and most keys letter by letter.
"""
from __future__ import annotations

import math
import random
import re
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

REPO = Path(__file__).resolve().parents[1]


def shared(*rel: str) -> Path:
    """The first of REPO/../shared, /work/shared, REPO/shared (the copy that travels to a device) that holds ``rel``."""
    for root in (REPO.parent / "shared", Path("/work/shared"), REPO / "shared"):
        if root.joinpath(*rel).exists():
            return root.joinpath(*rel)
    return REPO.parent.joinpath("shared", *rel)


ESSAYS = shared("data", "pg_essays")
STORIES = shared("data", "tinystories_val.txt")
SPECIALS = ("<pad>", "<s>", "</s>")

#: kind -> (haystack, keys, values per key, queries); the lm-eval task it mimics is in the module docstring
NIAH_KINDS: dict[str, tuple[str, int, int, int]] = {
    "single_repeat": ("repeat", 1, 1, 1),
    "single_essay": ("essay", 1, 1, 1),
    "multikey_essay": ("essay", 4, 1, 1),
    "multikey_needle": ("needle", 1, 1, 1),
    "multivalue": ("essay", 1, 4, 1),
    "multiquery": ("essay", 4, 1, 4),
}
KINDS = (*NIAH_KINDS, "vt", "text")
#: share of each kind among training rows (the four evaluated tasks' kinds weigh most)
DEFAULT_MIX = {"single_repeat": 0.12, "single_essay": 0.15, "multikey_essay": 0.15, "multikey_needle": 0.15,
               "multivalue": 0.06, "multiquery": 0.06, "vt": 0.06, "text": 0.25}
#: the start of training (short documents): the densest retrieval, a needle haystack asked several times, and one
#: needle in repeated sentences; the mix with which a CPU model learnt to retrieve (docs/benchmarks.md, issue 20)
DENSE_MIX = {"single_repeat": 0.4, "multikey_needle": 0.4, "text": 0.2}


@attrs.frozen
class RulerStrings:
    """What lm-eval's RULER generators put into a prompt (read from lm-eval, never retyped)."""

    niah_template: str
    needle: str
    repeat_haystack: str
    depths: tuple[int, ...]
    adjectives: tuple[str, ...]
    nouns: tuple[str, ...]
    vt_template: str


def ruler_strings() -> RulerStrings:
    """The prompt pieces of lm-eval's niah and variable-tracking generators (imported offline)."""
    from hybridize.plugins.evals.network import network

    with network(False):
        from lm_eval.tasks.ruler import niah_utils, prepare_niah, vt_utils

    return RulerStrings(niah_template=niah_utils.TEMPLATE, needle=prepare_niah.NEEDLE,
                        repeat_haystack=prepare_niah.get_haystack(type_haystack="repeat"),
                        depths=tuple(int(d) for d in prepare_niah.DEPTHS), adjectives=tuple(prepare_niah.adjs),
                        nouns=tuple(prepare_niah.nouns), vt_template=vt_utils.TEMPLATE)


def essay_sentences(essays_dir: str | Path = ESSAYS) -> list[str]:
    """The essay haystack of the RULER evaluator (its word list, in file order) split into sentences by the
    splitter lm-eval uses there (nltk punkt_tab, or untrained Punkt when that data is absent)."""
    from hybridize.plugins.evals import ruler
    from hybridize.plugins.evals.network import network

    with network(False):
        ruler.sentence_splitter()
        from lm_eval.tasks.ruler import prepare_niah

        return list(prepare_niah.cached_sent_tokenize(" ".join(ruler.essay_haystack(str(Path(essays_dir).resolve())))))


def story_paragraphs(path: str | Path = STORIES) -> list[str]:
    """TinyStories' blank-line separated stories."""
    return [p.strip() for p in Path(path).read_text(encoding="utf-8").split("\n\n") if p.strip()]


def essay_paragraphs(essays_dir: str | Path = ESSAYS) -> list[str]:
    """The essays' paragraphs (natural text beside the stories)."""
    out = []
    for p in sorted(Path(essays_dir).glob("*.txt")):
        out += [re.sub(r"\s+", " ", q).strip() for q in p.read_text(encoding="utf-8", errors="replace").split("\n\n")]
    return [q for q in out if len(q) > 40]


def split_texts(texts: Sequence[str], heldout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded (train, held-out) split of documents; at least one held out."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n = max(1, round(heldout_fraction * len(texts)))
    return [texts[i] for i in order[n:]], [texts[i] for i in order[:n]]


# -- tokenizer ----------------------------------------------------------------------------------------
def tokenizer_corpus(strings: RulerStrings, texts: Sequence[str], seed: int = 0, n_prompts: int = 3000) -> list[str]:
    """Training text of the tokenizer: natural text plus RULER-style needles and questions, so that the
    template's words and the keys' pieces get tokens of their own."""
    rng = random.Random(seed)
    extra = []
    for _ in range(n_prompts):
        key = _key(rng, strings)
        extra.append(strings.needle.format(type_needle_v="numbers", key=key, value=_number(rng)))
        extra.append(f"What is the special magic number for {key} mentioned in the provided text? "
                     f"The special magic number for {key} mentioned in the provided text is")
    return list(texts) + extra + [strings.niah_template, strings.vt_template, strings.repeat_haystack]


def build_tokenizer(texts: Sequence[str], vocab_size: int = 4096, max_length: int = 1_000_000) -> Any:
    """A byte-level BPE over ``texts``: digits split one per token, ``<s>`` prepended by default.

    Returns a ``PreTrainedTokenizerFast`` (``save_pretrained`` writes it, ``AutoTokenizer`` reads it back).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=max_length)


# -- random pieces --------------------------------------------------------------------------------------
def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _key(rng: random.Random, strings: RulerStrings) -> str:
    return f"{rng.choice(strings.adjectives)}-{rng.choice(strings.nouns)}"


def _joined(items: Sequence[str]) -> str:
    """``a``, ``a and b``-style listing as lm-eval joins several queried keys: ``a, b, and c``."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


@attrs.frozen
class Doc:
    """One retrieval document.

    Args:
        kind: one of :data:`KINDS` (not ``text``).
        context: what the model is given: the prompt and its ``gen_prefix``, as lm-eval's request holds it.
        answer: the continuation the teacher learns (`` 1234567.``); EOS follows it in a row.
        answers: the reference strings (lm-eval scores a prediction by containing each of them).
        needles: the needle sentences placed in the haystack.
        ids / answer_ids: tokens of ``context`` (BOS first) and of ``answer`` (no special tokens).
        tail: more questions, each (question ids, answer ids): the same question line and ``gen_prefix`` about
            another needle of the haystack (a multi-key or needle haystack has several), so a document teaches
            retrieval several times. A row puts them after the answer's EOS: lm-eval asks once, and the teacher
            learns to stop after its first answer.
        tail_text: the tail as text (the compare corpus); tail_answers: its reference values.
    """

    kind: str
    context: str
    answer: str
    answers: tuple[str, ...]
    needles: tuple[str, ...]
    ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    tail: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = ()
    tail_text: str = ""
    tail_answers: tuple[str, ...] = ()

    @property
    def n_tokens(self) -> int:
        return len(self.ids) + len(self.answer_ids) + 1 + sum(len(q) + len(a) for q, a in self.tail)  # 1: the EOS


class RecallData:
    """Seeded RULER-style documents, natural text and packed training rows for one tokenizer.

    Args:
        tokenizer: the teacher's tokenizer (BOS prepended by default).
        strings: :func:`ruler_strings`.
        sentences: the essay haystack's sentences (:func:`essay_sentences`).
        texts: natural-text documents for plain rows and fillers.
        mix: kind -> share of the rows (:data:`DEFAULT_MIX`).
        offset0: share of essay haystacks that start at the essays' first sentence, as lm-eval's always do.
        tail_questions: the most questions after the first one, about other needles (:attr:`Doc.tail`).
    """

    def __init__(self, tokenizer: Any, strings: RulerStrings, sentences: Sequence[str], texts: Sequence[str],
                 mix: dict[str, float] | None = None, offset0: float = 0.3, tail_questions: int = 4):
        self.tok, self.s, self.sentences, self.texts = tokenizer, strings, list(sentences), list(texts)
        self.mix = dict(mix or DEFAULT_MIX)
        bad = sorted(set(self.mix) - set(KINDS))
        if bad or not self.mix or min(self.mix.values()) < 0 or sum(self.mix.values()) <= 0:
            raise ValueError(f"mix must give shares >= 0 to kinds among {KINDS}; got {self.mix}")
        self.offset0, self.tail_questions = offset0, tail_questions
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.sent_tokens = self._count([" " + x for x in self.sentences])
        self.repeat_tokens = self._count(["\n" + strings.repeat_haystack])[0]
        self._text_ids: list[list[int]] | None = None
        self._least: dict[str, int] = {}

    def _count(self, texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self.tok(list(texts), add_special_tokens=False)["input_ids"]]

    def encode(self, text: str, *, bos: bool) -> list[int]:
        return self.tok(text, add_special_tokens=bos)["input_ids"]

    # -- retrieval documents -------------------------------------------------------------------------
    def document(self, rng: random.Random, kind: str, max_tokens: int, room: int | None = None) -> Doc:
        """One ``kind`` document whose tokens (BOS, context, answer, EOS, tail) are at most ``max_tokens``;
        ``room`` fixes the haystack's tokens instead (0: needles only)."""
        if kind not in KINDS or kind == "text":
            raise ValueError(f"kind must be one of {KINDS[:-1]}; got {kind!r}")
        budget = max_tokens
        for _ in range(6):  # shrink the haystack until the document fits
            doc = self._vt(rng, budget, room) if kind == "vt" else self._niah(rng, kind, budget, room)
            over = doc.n_tokens - max_tokens
            if over <= 0:
                return doc
            budget -= over + 8
        raise ValueError(f"a {kind} document does not fit in {max_tokens} tokens; raise the row length")

    def _niah(self, rng: random.Random, kind: str, budget: int, room: int | None = None) -> Doc:
        haystack, n_keys, n_values, n_queries = NIAH_KINDS[kind]
        keys = [_key(rng, self.s) for _ in range(n_keys)]
        values = [[_number(rng) for _ in range(n_values)] for _ in keys]
        needles = [self.s.needle.format(type_needle_v="numbers", key=k, value=v) for k, vs in zip(keys, values) for v in vs]
        rng.shuffle(needles)
        asked = rng.sample(range(n_keys), n_queries)
        query = _joined([keys[i] for i in asked])
        answers = tuple(v for i in asked for v in values[i])
        one = len(answers) == 1
        template = self._singular(self.s.niah_template) if one else self.s.niah_template
        head = template.format(type_needle_v="number" if one else "numbers", context="\x00", query=query)
        pool = [(keys[i], values[i][0]) for i in range(n_keys) if i not in asked and n_values == 1]
        n_tail = min(self.tail_questions, len(pool) + (self.tail_questions if haystack == "needle" else 0))
        if room is None:
            room = budget - len(self.encode(head, bos=True)) - sum(self._count(needles)) - 24 - 40 * n_tail
        context, distractors = self._context(rng, haystack, needles, max(room, 0))
        text = head.replace("\x00", context) + " " + self._prefix(query, one)
        answer = " " + _joined(list(answers)) + "."
        pool += distractors
        tail = rng.sample(pool, min(n_tail, len(pool)))
        pieces = [(self._question(k) + " " + self._prefix(k, True), f" {v}.") for k, v in tail]
        return Doc(kind=kind, context=text, answer=answer, answers=answers, needles=tuple(needles),
                   ids=tuple(self.encode(text, bos=True)), answer_ids=tuple(self.encode(answer, bos=False)),
                   tail=tuple((tuple(self.encode(q, bos=False)), tuple(self.encode(a, bos=False))) for q, a in pieces),
                   tail_text="".join(q + a for q, a in pieces), tail_answers=tuple(v for _, v in tail))

    @staticmethod
    def _prefix(query: str, one: bool) -> str:
        """lm-eval's ``gen_prefix`` of a niah sample."""
        return (f"The special magic number for {query} mentioned in the provided text is" if one
                else f"The special magic numbers for {query} mentioned in the provided text are")

    def _question(self, key: str) -> str:
        """The template's question line (after the context) for one key, one value: ``\nWhat is ... for KEY ...?``."""
        return self._singular(self.s.niah_template).split("{context}")[1].format(type_needle_v="number", query=key)

    @staticmethod
    def _singular(template: str) -> str:
        """lm-eval's rewrite of the template for one needle asked once ("A special magic number is ...")."""
        for a, b in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template = template.replace(a, b)
        return template

    def _context(self, rng: random.Random, haystack: str, needles: list[str], room: int) -> tuple[str, list[tuple[str, str]]]:
        """The haystack with the needles in it, about ``room`` tokens of haystack; and the (key, value) of every
        distractor needle (a needle haystack's lines)."""
        if haystack == "essay":
            return self._essay(rng, needles, room), []
        pairs: list[tuple[str, str]] = []
        if haystack == "repeat":
            units = [self.s.repeat_haystack] * max(len(needles), room // self.repeat_tokens)
        else:
            per = max(1, len(self.encode("\n" + needles[0], bos=False)))
            pairs = [(_key(rng, self.s), _number(rng)) for _ in range(max(len(needles), room // per))]
            units = [self.s.needle.format(type_needle_v="numbers", key=k, value=v) for k, v in pairs]
        for index, needle in zip(sorted(rng.sample(range(len(units)), len(needles)), reverse=True), needles):
            units.insert(index, needle)
        return "\n".join(units), pairs

    def _essay(self, rng: random.Random, needles: list[str], room: int) -> str:
        """Essay sentences from the first one (share ``offset0``) or a random one, needles at sampled depths."""
        n = len(self.sentences)
        start = 0 if rng.random() < self.offset0 else rng.randrange(n)
        sents, used, i = [], 0, start
        while used < room and len(sents) < n:
            sents.append(self.sentences[i % n])
            used += self.sent_tokens[i % n]
            i += 1
        cuts = [0] + sorted(int(len(sents) * d / 100) for d in rng.sample(self.s.depths, len(needles))) + [len(sents)]
        pieces = []
        for j in range(1, len(cuts)):
            pieces.append(" ".join(sents[cuts[j - 1]:cuts[j]]))
            if j - 1 < len(needles):
                pieces.append(needles[j - 1])
        return " ".join(pieces)

    def _vt(self, rng: random.Random, budget: int, room: int | None = None, hops: int = 4) -> Doc:
        """Variable tracking: one chain ``VAR A = 12345``, ``VAR B = VAR A``, ... in repeated noise lines."""
        names: list[str] = []
        while len(names) < hops + 1:
            name = "".join(rng.choices(string.ascii_uppercase, k=5))
            names += [name] if name not in names else []
        value = str(rng.randint(10000, 99999))
        chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]
        head = self.s.vt_template.format(context="\x00", query=value, num_v=hops + 1)
        if room is None:
            room = budget - len(self.encode(head, bos=True)) - sum(self._count(chain)) - 24
        lines = [self.s.repeat_haystack + "\n"] * max(len(chain) + 1, room // self.repeat_tokens)
        for j, pos in enumerate(sorted(rng.sample(range(len(lines)), len(chain)))):
            lines.insert(pos + j, chain[j])
        text = head.replace("\x00", " ".join(lines).replace(". \n", ".\n"))
        answer = " ".join(names)
        return Doc(kind="vt", context=text, answer=answer, answers=tuple(names), needles=tuple(chain),
                   ids=tuple(self.encode(text, bos=True)), answer_ids=tuple(self.encode(answer, bos=False)))

    # -- rows --------------------------------------------------------------------------------------------
    def kind(self, rng: random.Random, mix: dict[str, float] | None = None) -> str:
        mix = mix or self.mix
        kinds = list(mix)
        return rng.choices(kinds, weights=[mix[k] for k in kinds])[0]

    def least_tokens(self, kind: str) -> int:
        """About the fewest tokens a ``kind`` document takes (no haystack; room for long keys)."""
        if kind not in self._least:
            rng = random.Random(0)
            sizes = [d.n_tokens for d in (self.document(rng, kind, 10**6, room=0) for _ in range(8))]
            self._least[kind] = max(sizes) + 16
        return self._least[kind]

    def doc_length(self, rng: random.Random, kind: str, most: int) -> int:
        """A ``kind`` document's token budget up to ``most``: half in its top 40%, half anywhere above the kind's least
        (the least when ``most`` is below it)."""
        lo = self.least_tokens(kind)
        hi = max(lo, most)
        return rng.randint(max(lo, int(0.6 * hi)), hi) if rng.random() < 0.5 else rng.randint(lo, hi)

    def _text_tokens(self) -> list[list[int]]:
        if self._text_ids is None:
            self._text_ids = self.tok(self.texts, add_special_tokens=False)["input_ids"]
        return self._text_ids

    def _fill(self, rng: random.Random, n: int) -> list[int]:
        """``n`` tokens of natural text: BOS + document + EOS, documents drawn at random, the last one cut."""
        out: list[int] = []
        docs = self._text_tokens()
        while len(out) < n:
            out += [self.bos] + docs[rng.randrange(len(docs))] + [self.eos]
        return out[:n]

    def row(self, rng: random.Random, T: int, doc_max: int | None = None, mix: dict[str, float] | None = None
            ) -> tuple[list[int], list[int]]:
        """One training row: (T token ids, T answer flags), flag 1 where the token is part of an answer (or its EOS).

        Retrieval documents of at most ``doc_max`` tokens (default T) follow each other from position 0 while
        they fit (with ``doc_max`` < T several share a row: denser answers for a short-context start); a draw of
        ``text``, or a remainder too short for the drawn kind, ends the row with natural text. ``mix``: the kinds'
        shares for this row (default the generator's)."""
        ids: list[int] = []
        flags: list[int] = []
        too_long = [k for k, w in (mix or self.mix).items() if k != "text" and w > 0 and self.least_tokens(k) > T]
        if too_long:
            raise ValueError(f"{too_long} documents need more tokens than rows of {T} hold with this tokenizer; raise the row length")
        while True:
            kind, room = self.kind(rng, mix), T - len(ids)
            if kind == "text" or self.least_tokens(kind) > room:
                return ids + self._fill(rng, room), flags + [0] * room
            doc = self.document(rng, kind, min(room, self.doc_length(rng, kind, doc_max or T)))
            ids = ids + list(doc.ids) + list(doc.answer_ids) + [self.eos]  # EOS right after lm-eval's answer: stop there
            flags = flags + [0] * len(doc.ids) + [1] * (len(doc.answer_ids) + 1)
            for q, a in doc.tail:  # then more questions about the same haystack, after the EOS
                ids, flags = ids + list(q) + list(a), flags + [0] * len(q) + [1] * len(a)

    def batch(self, seed: int, T: int, rows: int, doc_max: int | None = None, mix: dict[str, float] | None = None
              ) -> tuple[Any, Any]:
        """``rows`` training rows from ``seed`` (:meth:`row`): int64 ids and uint8 answer flags, each (rows, T)."""
        import numpy as np

        rng = random.Random(seed)
        made = [self.row(rng, T, doc_max, mix) for _ in range(rows)]
        return np.array([m[0] for m in made], dtype=np.int64), np.array([m[1] for m in made], dtype=np.uint8)

    # -- a corpus for hybridize compare --------------------------------------------------------------------------
    def corpus_rows(self, rng: random.Random, T: int) -> list[str]:
        """One row as text documents whose tokens with hybridize's separators (BOS + document + EOS each)
        fill exactly T: a retrieval document (context and answer as one text; its tail questions as the next
        document) or none, then natural text."""
        docs: list[str] = []
        kind = self.kind(rng)
        if kind != "text":
            doc = self.document(rng, kind, self.doc_length(rng, kind, T) - 8)
            docs += [doc.context + doc.answer] + ([doc.tail_text.strip()] if doc.tail else [])  # hybridize strips documents
        gap = T - sum(len(self.encode(d, bos=False)) + 2 for d in docs)
        while gap:
            text, n = self._exact_text(rng, gap)
            docs.append(text)
            gap -= n + 2
        return docs

    def _exact_text(self, rng: random.Random, gap: int) -> tuple[str, int]:
        """A natural-text prefix of n tokens with n + 2 == gap, or n + 2 <= gap - 3 (room for another document)."""
        for _ in range(200):
            text = self.texts[rng.randrange(len(self.texts))]
            enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
            ends = [e for _, e in enc["offset_mapping"]]
            # a prefix ends where the next token starts a new word (byte-level BPE: the space leads the word)
            cuts = [i for i in range(1, len(ends) + 1) if i == len(ends) or text[ends[i - 1]:ends[i - 1] + 1].isspace()]
            for n in sorted(cuts, reverse=True):
                if n + 2 == gap or n + 2 <= gap - 3:
                    prefix = text[: ends[n - 1]]
                    if prefix == prefix.strip() and len(self.encode(prefix, bos=False)) == n:  # hybridize strips documents
                        return prefix, n
        raise RuntimeError(f"no natural-text prefix fills a gap of {gap} tokens")


def write_corpus(data: RecallData, path: str | Path, *, tokens: int, T: int, seed: int) -> dict[str, Any]:
    """``ceil(tokens / T)`` rows of :meth:`RecallData.corpus_rows` as jsonl (``{"text": ...}`` per document),
    written atomically. Returns a summary (rows, documents, kinds)."""
    import json

    from hybridize.atomic_io import write_json_text

    rng = random.Random(seed)
    rows = math.ceil(tokens / T)
    lines = []
    for _ in range(rows):
        lines += [json.dumps({"text": d}) for d in data.corpus_rows(rng, T)]
    write_json_text(Path(path), "\n".join(lines) + "\n")
    return {"rows": rows, "documents": len(lines), "tokens": rows * T, "seq_len": T, "seed": seed}


def load(tokenizer: Any, *, essays_dir: str | Path = ESSAYS, stories: str | Path = STORIES, heldout_fraction: float = 0.05,
         seed: int = 0, mix: dict[str, float] | None = None) -> tuple[RecallData, list[str]]:
    """The generator over the shared essays and stories, and the held-out stories it never trains on."""
    train, held = split_texts(story_paragraphs(stories), heldout_fraction, seed)
    texts = train + essay_paragraphs(essays_dir)
    return RecallData(tokenizer, ruler_strings(), essay_sentences(essays_dir), texts, mix=mix), held
