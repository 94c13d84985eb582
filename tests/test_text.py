"""Text sources and packing: documents from every kind of source, BOS-first blocks, passes, padding."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

from actdata.config import ConfigError, DatasetConfig
from actdata.generation.text import TokenBlocks, documents, pack

DOCS = [f"document number {i} says {'hello ' * (i % 4 + 1)}".strip() for i in range(12)]


class WordTokenizer:
    """A stand-in tokenizer: one id per word (10 + its number in `vocab`), BOS 1, EOS 2, pad 0."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __init__(self):
        self.vocab = {}

    def __call__(self, texts, add_special_tokens=True):
        assert not add_special_tokens
        return {"input_ids": [[10 + self.vocab.setdefault(w, len(self.vocab)) for w in t.split()] for t in texts]}


def test_pack_bos_first_exact_length_and_lossless():
    docs = [[10, 11, 12], [13], [14, 15, 16, 17, 18, 19, 20], [21, 22]]
    blocks = list(pack(docs, 5, bos_id=1, sep_id=2))
    assert all(b[0] == 1 for b in blocks)
    assert all(len(b) == 5 for b in blocks[:-1]) and 1 < len(blocks[-1]) <= 5
    stream = [t for b in blocks for t in b[1:]]
    assert stream == [10, 11, 12, 2, 13, 2, 14, 15, 16, 17, 18, 19, 20, 2, 21, 22, 2]


def test_pack_without_separator():
    assert list(pack([[5, 6], [7, 8]], 3, bos_id=9, sep_id=None)) == [[9, 5, 6], [9, 7, 8]]


def write_jsonl(path, docs, column="text"):
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({column: d, "other": 1}) + "\n")


@pytest.mark.parametrize("streaming", [True, False])
def test_local_jsonl_documents_shuffled_per_pass(tmp_path, streaming):
    write_jsonl(tmp_path / "a.jsonl", DOCS)
    d = DatasetConfig(name=str(tmp_path / "a.jsonl"), streaming=streaming, shuffle_buffer=100, seed=1)
    p0, p0_again, p1 = list(documents(d, 0)), list(documents(d, 0)), list(documents(d, 1))
    assert sorted(p0) == sorted(DOCS) == sorted(p1)
    assert p0 == p0_again, "same seed and pass must give the same order"
    assert p0 != DOCS and p0 != p1, "documents must be shuffled, differently each pass"
    d2 = DatasetConfig(name=str(tmp_path / "a.jsonl"), streaming=streaming, shuffle_buffer=100, seed=2)
    assert list(documents(d2, 0)) != p0


def test_directory_of_text_files_splits_paragraphs(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "one.txt").write_text("first paragraph\nstill first\n\nsecond paragraph\n")
    (tmp_path / "sub" / "two.txt").write_text("third paragraph\n")
    docs = list(documents(DatasetConfig(name=str(tmp_path)), 0))
    assert sorted(d.strip() for d in docs) == ["first paragraph\nstill first", "second paragraph", "third paragraph"]


def test_parquet_file_with_other_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": DOCS, "n": list(range(12))}), tmp_path / "c.parquet")
    docs = list(documents(DatasetConfig(name=str(tmp_path / "c.parquet"), text_column="body"), 0))
    assert sorted(docs) == sorted(DOCS)


def test_missing_text_column_names_the_key(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", DOCS, column="content")
    with pytest.raises(ConfigError, match=r"^dataset\.text_column:"):
        list(documents(DatasetConfig(name=str(tmp_path / "a.jsonl")), 0))


def test_mixed_formats_and_empty_directory_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"^dataset\.name:"):
        list(documents(DatasetConfig(name=str(tmp_path)), 0))
    (tmp_path / "a.txt").write_text("x\n")
    write_jsonl(tmp_path / "b.jsonl", DOCS)
    with pytest.raises(ConfigError, match=r"^dataset\.name:"):
        list(documents(DatasetConfig(name=str(tmp_path)), 0))


def test_embedded_corpus_is_the_kjv_by_chapter():
    docs = list(documents(DatasetConfig(name="embedded", seed=0), 0))
    assert len(docs) == 1189  # chapters of the King James Bible
    assert any(d.startswith("In the beginning God created the heaven and the earth.") for d in docs)
    assert not docs[0].startswith("In the beginning"), "documents must be shuffled"
    assert sum(len(d) for d in docs) > 4_000_000


def test_token_blocks_loop_over_the_corpus_and_count_passes():
    docs = lambda d, epoch: iter(DOCS)  # noqa: E731
    tb = TokenBlocks(DatasetConfig(name="x"), WordTokenizer(), context_length=8, batch_size=3, docs=docs)
    per_pass = sum(len(t.split()) + 1 for t in DOCS)  # tokens + EOS per document
    batches = []
    for b in tb:
        batches.append(b)
        if b.corpus_passes >= 2:
            break
    for b in batches:
        assert b.input_ids.shape == (3, 8) and bool(b.attention_mask.all())
        assert (b.input_ids[:, 0] == 1).all()
    body_tokens = sum(int((b.input_ids[:, 1:] != 0).sum()) for b in batches)
    assert body_tokens >= 2 * per_pass - 3 * 7  # the loop continued past the first pass end
    assert [b.corpus_passes for b in batches] == sorted(b.corpus_passes for b in batches)


def test_token_blocks_without_loop_pad_the_last_block():
    docs = lambda d, epoch: iter(DOCS[:4])  # noqa: E731
    batches = list(TokenBlocks(DatasetConfig(name="x"), WordTokenizer(), 8, 2, loop=False, docs=docs))
    last = batches[-1]
    n_tokens = sum(len(t.split()) + 1 for t in DOCS[:4])
    assert sum(int(b.attention_mask[:, 1:].sum()) for b in batches) == n_tokens
    assert not bool(last.attention_mask.all())
    assert (last.input_ids[last.attention_mask == 0] == 0).all(), "padding uses the pad id"
    assert last.corpus_passes == 1


def test_empty_corpus_fails_clearly():
    docs = lambda d, epoch: iter([])  # noqa: E731
    with pytest.raises(ConfigError, match="no non-empty text"):
        next(iter(TokenBlocks(DatasetConfig(name="x"), WordTokenizer(), 8, 2, docs=docs)))
