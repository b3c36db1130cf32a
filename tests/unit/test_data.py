"""Data loading, packing, splitting and the resumable sampler."""
from __future__ import annotations

import json

import pytest
import torch

from hybridize.training.data import BlockSampler, DataConfig, DataError, load_documents, pack, prepare_data, split_blocks


class CharTokenizer:
    """A tiny stand-in for a HF tokenizer: one id per character."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[3 + (ord(c) % 50) for c in t] for t in texts]}


def test_text_paragraphs_are_documents(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first doc line one\nline two\n\nsecond doc\n\n\nthird\n")
    assert load_documents(str(f)) == ["first doc line one\nline two", "second doc", "third"]


def test_jsonl_and_directory(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "x.jsonl").write_text("\n".join(json.dumps({"body": f"doc {i}"}) for i in range(3)))
    assert load_documents(str(d), text_field="body") == ["doc 0", "doc 1", "doc 2"]
    with pytest.raises(DataError, match="no column 'text'"):
        load_documents(str(d))


def test_packing_with_separators(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("abc\n\ndefg\n")
    data = prepare_data(DataConfig(train=str(f), seq_len=3, heldout_fraction=0.3), CharTokenizer(), seed=0)
    assert data.n_tokens == 2 + 3 + 2 + 4  # BOS + doc + EOS, twice
    assert data.train.shape[1] == 3 and data.train.shape[0] + data.heldout.shape[0] == 3
    assert data.heldout.shape[0] == 1


def test_empty_and_short_data_errors(tmp_path):
    empty = tmp_path / "e.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(DataError, match="no non-empty documents"):
        load_documents(str(empty))
    with pytest.raises(DataError, match=r"has 5 tokens after tokenization, fewer than one block of seq_len=8"):
        pack([1, 2, 3, 4, 5], 8)
    with pytest.raises(DataError, match="does not exist"):
        load_documents(str(tmp_path / "missing.txt"))


def test_split_is_seeded_and_disjoint():
    blocks = torch.arange(40).view(20, 2)
    a1, h1 = split_blocks(blocks, 0.25, seed=3)
    a2, h2 = split_blocks(blocks, 0.25, seed=3)
    assert torch.equal(a1, a2) and torch.equal(h1, h2) and h1.shape[0] == 5
    assert not set(a1[:, 0].tolist()) & set(h1[:, 0].tolist())


def test_sampler_resumes_exactly():
    s = BlockSampler(7, 3, seed=1)
    seq = [s.next_indices().tolist() for _ in range(5)]
    t = BlockSampler(7, 3, seed=1)
    for _ in range(2):
        t.next_indices()
    u = BlockSampler(7, 3, seed=99)
    u.load_state_dict(t.state_dict())
    assert [u.next_indices().tolist() for _ in range(3)] == seq[2:]
    flat = sum(seq[:2], []) + seq[2][:1]
    assert sorted(flat) == list(range(7))  # first epoch covers every block once


def test_data_config_validation():
    with pytest.raises(ValueError):
        DataConfig(train="x", seq_len=1)


def _via_datasets(builder, files, text_field="text"):
    datasets = pytest.importorskip("datasets")
    kw = {"sample_by": "paragraph"} if builder == "text" else {}
    ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **kw)
    return [t.strip() for t in ds[text_field] if isinstance(t, str) and t.strip()]


def test_local_reading_matches_datasets(tmp_path):
    """The direct reader gives the documents ``datasets``' builders give, in the same order."""
    f = tmp_path / "a.txt"
    f.write_text("one\n\ntwo\nlines\n\n\n\nthree  \n\n \n\nfour" + "\n\nx" * 3000)
    assert load_documents(str(f)) == _via_datasets("text", [f])
    j = tmp_path / "b.jsonl"
    j.write_text("\n".join(json.dumps({"text": f"doc {i}\n\nwith break", "id": i}) for i in range(50)) + "\n\n")
    assert load_documents(str(j)) == _via_datasets("json", [j])
    arr = tmp_path / "c.json"
    arr.write_text(json.dumps([{"text": f"row {i}"} for i in range(5)]))
    assert load_documents(str(arr)) == _via_datasets("json", [arr]) == [f"row {i}" for i in range(5)]


def test_local_reading_matches_datasets_on_real_text(shared_dir):
    real = shared_dir / "data" / "tinystories_val.txt"
    assert load_documents(str(real)) == _via_datasets("text", [real])


def test_local_text_needs_no_datasets(tmp_path):
    import subprocess
    import sys

    f = tmp_path / "a.txt"
    f.write_text("a\n\nb\n")
    code = ("import sys; sys.modules['datasets'] = None\n"
            "from hybridize.training.data import load_documents, DataError\n"
            f"assert load_documents({str(f)!r}) == ['a', 'b']\n"
            "try:\n    load_documents('some-org/some-set')\nexcept DataError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "needs the datasets package" in out and "some-org/some-set" in out


def test_bad_json_rows_are_named(tmp_path):
    j = tmp_path / "b.jsonl"
    j.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=r"line 2 is not valid JSON"):
        load_documents(str(j))
    j.write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"row 1 is not a JSON object"):
        load_documents(str(j))
