"""Data: local text / jsonl / parquet files or directories (or a hub id) -> tokens -> packed blocks.

Documents are tokenized with the teacher's tokenizer, joined with document separators
(BOS before a document when the tokenizer has one, EOS after it) and cut into fixed-length
blocks; a seeded permutation of the blocks gives the train / held-out split. Every stage
counts the tokens it consumes from these blocks.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from hybridize.errors import ConfigError, HybridizeError

BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(HybridizeError, ValueError):
    """The data cannot be used (missing, empty, shorter than one block)."""


@attrs.frozen(kw_only=True)
class DataConfig:
    """Where the text comes from and how it is cut.

    Args:
        train: a file, a directory, a list of files, or a hub data-set id.
        heldout: optional separate held-out source; otherwise ``heldout_fraction`` of the blocks.
        heldout_fraction: share of blocks held out (at least one block).
        seq_len: tokens per block.
        text_field: the column holding the text in jsonl / parquet / hub data.
        max_tokens: stop reading after this many tokens (0 = all).
        allow_longer_than_teacher: accept a ``seq_len`` above the teacher's ``max_position_embeddings``
            (for a teacher that extrapolates, e.g. with rope scaling); off, such a ``seq_len`` is refused.
    """

    train: str | list[str] = attrs.field()
    heldout: str | list[str] | None = None
    heldout_fraction: float = attrs.field(default=0.05, validator=[attrs.validators.ge(0.0), attrs.validators.lt(1.0)])
    seq_len: int = attrs.field(default=512, validator=attrs.validators.ge(2))
    text_field: str = "text"
    max_tokens: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    allow_longer_than_teacher: bool = False


@attrs.frozen
class PackedData:
    """Packed token blocks. ``train`` is (N, seq_len), ``heldout`` is (M, seq_len), both int64."""

    train: torch.Tensor
    heldout: torch.Tensor
    n_documents: int
    n_tokens: int

    @property
    def seq_len(self) -> int:
        return self.train.shape[1]


def _files(source: str | Sequence[str], field: str) -> tuple[str, list[str]] | None:
    """Resolve local paths to (builder, files); None means "not local" (a hub id)."""
    sources = [source] if isinstance(source, str) else list(source)
    files: list[Path] = []
    for s in sources:
        p = Path(s).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix in BUILDERS and f.is_file())
            if not found:
                raise DataError(f"data field '{field}': directory {str(p)!r} has no {'/'.join(BUILDERS)} files")
            files += found
        elif p.is_file():
            files.append(p)
        elif isinstance(source, str) and not p.is_absolute() and not s.startswith(".") and s.count("/") <= 1:
            return None  # looks like a hub id
        else:
            raise DataError(f"data field '{field}': {s!r} does not exist; give a file, a directory or a hub id")
    builders = {BUILDERS.get(f.suffix) for f in files}
    if None in builders or len(builders) != 1:
        kinds = sorted({f.suffix for f in files})
        raise DataError(f"data field '{field}' mixes or has unsupported file types {kinds}; use one of {sorted(BUILDERS)}")
    return builders.pop(), [str(f) for f in files]


def _check_text(items: Sequence[tuple[str, Any]], f: str, field: str, text_field: str) -> None:
    """Every row's ``text_field``, where present, must be a string (``where`` names the line or row)."""
    for where, item in items:
        value = item.get(text_field)
        if text_field in item and not isinstance(value, str):
            raise DataError(f"data field '{field}': {f!r} {where} field {text_field!r} must be a string; got {value!r}. "
                            "Fix that row, or set data.text_field to the column that holds the text")


def _read_local(builder: str, files: Sequence[str], field: str, text_field: str = "text") -> list[dict[str, Any]] | None:
    """Rows of local text / json files read without ``datasets`` (None: parquet, left to ``datasets``).

    Text files give one row per paragraph (split on a blank line, as ``datasets``' text builder with
    ``sample_by="paragraph"`` does); .jsonl gives one row per non-blank line; .json is either a list
    of objects or JSON lines.
    """
    import json

    if builder == "parquet":
        return None
    rows: list[dict[str, Any]] = []
    for f in files:
        try:
            text = Path(f).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"data field '{field}': cannot read {f!r}: {exc}") from exc
        if builder == "text":
            rows += [{"text": para} for para in text.split("\n\n") if para]
            continue
        if f.endswith(".json") and text.lstrip().startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"data field '{field}': {f!r} is not valid JSON: {exc}") from exc
            where = [f"row {i}" for i in range(len(items))] if isinstance(items, list) else []
        else:
            items, where = [], []
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        items.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise DataError(f"data field '{field}': {f!r} line {n} is not valid JSON: {exc}") from exc
                    where.append(f"line {n}")
        bad = next((i for i, item in enumerate(items) if not isinstance(item, dict)), None)
        if bad is not None:
            raise DataError(f"data field '{field}': {f!r} row {bad} is not a JSON object; give one object per row")
        _check_text(list(zip(where, items)), f, field, text_field)
        rows += items
    return rows


def load_documents(source: str | Sequence[str], *, field: str = "train", text_field: str = "text") -> list[str]:
    """Read documents: paragraphs of text files, or the ``text_field`` of jsonl / parquet / hub rows.

    Local text and json files are read directly; ``datasets`` is imported only for parquet files
    and hub ids, so a run on local text needs no ``datasets`` installed.
    """
    resolved = _files(source, field)
    rows = _read_local(*resolved, field, text_field) if resolved is not None else None
    if rows == []:
        raise DataError(f"data field '{field}': {source!r} is empty (no text at all); give a file with at least one document")
    if rows is not None:
        columns = sorted({k for r in rows for k in r})
        texts = [r.get(text_field) for r in rows]
    else:
        try:
            import datasets
        except ImportError as exc:
            what = "parquet files" if resolved is not None else f"hub data set {source!r}"
            raise DataError(f"data field '{field}': reading {what} needs the datasets package; "
                            f"pip install datasets, or give local .txt / .jsonl files") from exc
        try:
            if resolved is None:
                ds = datasets.load_dataset(source, split="train")
            else:
                ds = datasets.load_dataset(resolved[0], data_files=resolved[1], split="train")
        except (FileNotFoundError, ConnectionError, OSError, ValueError) as exc:
            raise DataError(f"data field '{field}': cannot load {source!r}: {exc}") from exc
        columns = list(ds.column_names)
        texts = ds[text_field] if text_field in columns else []
    if text_field not in columns:
        raise DataError(f"data field '{field}' has no column {text_field!r} (columns: {columns}); set data.text_field")
    docs = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
    if not docs:
        raise DataError(f"data field '{field}': {source!r} holds no non-empty documents")
    return docs


def tokenize_documents(docs: Sequence[str], tokenizer: Any, *, max_tokens: int = 0, batch: int = 1000) -> list[int]:
    """Tokenize and join documents with separators (BOS before, EOS after, when the tokenizer has them)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out: list[int] = []
    for i in range(0, len(docs), batch):
        for ids in tokenizer(list(docs[i : i + batch]), add_special_tokens=False)["input_ids"]:
            out += ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else [])
        if max_tokens and len(out) >= max_tokens:
            return out[:max_tokens]
    return out


def pack(tokens: Sequence[int], seq_len: int, *, field: str = "train") -> torch.Tensor:
    """Cut a token stream into (N, seq_len) blocks, dropping the ragged tail."""
    n = len(tokens) // seq_len
    if n == 0:
        raise DataError(
            f"data field '{field}' has {len(tokens)} tokens after tokenization, fewer than one block of "
            f"seq_len={seq_len}; add data or lower data.seq_len"
        )
    return torch.tensor(tokens[: n * seq_len], dtype=torch.long).view(n, seq_len)


def split_blocks(blocks: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split into (train, heldout); at least one block each."""
    n = blocks.shape[0]
    n_held = max(1, round(fraction * n))
    if n - n_held < 1:
        raise DataError(f"data has {n} block(s) of seq_len={blocks.shape[1]}: too few to hold out {n_held}; add data")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return blocks[perm[n_held:]], blocks[perm[:n_held]]


def prepare_data(cfg: DataConfig, tokenizer: Any, *, seed: int = 0) -> PackedData:
    """Load, tokenize, pack and split the data of a run."""
    if tokenizer is None:
        raise ConfigError("the teacher has no tokenizer; put tokenizer files in the teacher directory")
    docs = load_documents(cfg.train, field="train", text_field=cfg.text_field)
    tokens = tokenize_documents(docs, tokenizer, max_tokens=cfg.max_tokens)
    blocks = pack(tokens, cfg.seq_len, field="train")
    if cfg.heldout is not None:
        held_docs = load_documents(cfg.heldout, field="heldout", text_field=cfg.text_field)
        held = pack(tokenize_documents(held_docs, tokenizer), cfg.seq_len, field="heldout")
        train = blocks
    else:
        train, held = split_blocks(blocks, cfg.heldout_fraction, seed)
    return PackedData(train=train, heldout=held, n_documents=len(docs), n_tokens=len(tokens))


@attrs.define
class BlockSampler:
    """Deterministic, resumable batches of block indices: a fresh seeded permutation per epoch.

    ``state_dict()`` / ``load_state_dict()`` capture the data position for exact resume.
    """

    n_blocks: int
    batch_size: int
    seed: int = 0
    epoch: int = 0
    cursor: int = 0

    def _perm(self) -> torch.Tensor:
        return torch.randperm(self.n_blocks, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))

    def next_indices(self) -> torch.Tensor:
        """The next batch of block indices (wraps to a new epoch when the current one runs out)."""
        perm, out, have = self._perm(), [], 0
        while have < self.batch_size:
            if self.cursor >= self.n_blocks:
                self.epoch, self.cursor = self.epoch + 1, 0
                perm = self._perm()
            take = min(self.batch_size - have, self.n_blocks - self.cursor)
            out.append(perm[self.cursor : self.cursor + take])
            self.cursor += take
            have += take
        return torch.cat(out)

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_indices()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor, self.seed = state["epoch"], state["cursor"], state["seed"]
