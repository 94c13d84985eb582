"""Text sources and packing: documents from every kind of source, BOS-first blocks, passes, padding."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

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


# -- the tokenizer off the consuming thread --------------------------------------------------------------

@pytest.fixture(scope="module")
def embedded_tokenizer():
    from actdata.config import Config
    from actdata.generation.loading import load_tokenizer

    return load_tokenizer(Config())


class RecordingFastTokenizer:
    """The embedded fast tokenizer, recording which threads its Rust batch call runs in."""

    def __init__(self, tok):
        self.tok, self.threads = tok, set()
        self.bos_token_id, self.eos_token_id, self.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        self._tokenizer = self

    def encode_batch_fast(self, texts, add_special_tokens):
        import threading

        self.threads.add(threading.current_thread().name)
        return self.tok._tokenizer.encode_batch_fast(texts, add_special_tokens=add_special_tokens)


def test_token_blocks_equal_the_reference_packing_and_tokenise_in_a_pool(embedded_tokenizer):
    """The pooled, numpy-packed blocks are exactly what the reference (the tokenizer's own call, then
    `pack_tracked`) makes, positions included, from the start and from a saved position; the tokenizer
    runs in the pool's threads, never in the thread that iterates."""
    from actdata.generation.text import pack_tracked

    tok = embedded_tokenizer
    d = DatasetConfig(name="embedded", seed=3)
    sep = [tok.eos_token_id]
    texts = list(documents(d, 0))[:200]

    def reference():
        streams = ((0, i, tok(t, add_special_tokens=False)["input_ids"] + sep, 0) for i, t in enumerate(texts))
        blocks = list(pack_tracked(streams, 64, tok.bos_token_id))
        return [blocks[i:i + 4] for i in range(0, len(blocks) - 4, 4)][:60]

    recording = RecordingFastTokenizer(tok)
    tb = TokenBlocks(d, recording, 64, 4, docs=lambda _d, epoch: iter(texts), threads=2)
    got = []
    for b in tb:
        got.append(b)
        if len(got) == 60:
            break
    ref = reference()
    for b, r in zip(got, ref, strict=True):
        assert b.input_ids.tolist() == [blk for blk, _ in r] and b.position == r[-1][1]
    assert recording.threads and all(n.startswith("actdata-tokenizer") for n in recording.threads)
    pos = got[20].position
    resumed = TokenBlocks(d, tok, 64, 4, docs=lambda _d, epoch: iter(texts), start=pos, threads=2)
    for a, b in zip(got[21:40], resumed):
        assert torch.equal(a.input_ids, b.input_ids) and a.position == b.position
