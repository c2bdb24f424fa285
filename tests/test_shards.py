"""Token shards: parallel, deterministic encoding; nothing lost at shard ends; the memory-mapped reader."""
from __future__ import annotations

import gzip
import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from xiaolm.data.shards import (
    ShardMismatchError,
    TokenShards,
    dtype_for_vocab,
    main as tokenize_main,
    tokenize_to_shards,
)
from xiaolm.data.sources import resolve_inputs
from xiaolm.data.vocab import train_tokenizer
from xiaolm.errors import XiaolmError
from xiaolm.tokenizer import load_tokenizer

_WORDS = ["小明", "莉莉", "小猫", "老奶奶", "公园", "气球", "苹果", "开心", "难过", "朋友", "河边", "Hello", "OK", "2024"]
_PUNCT = ["，", "。", "！", "？", "“", "”", "\n", " ", "、"]
SHARD_TOKENS = 700


def make_docs(n: int, seed: int) -> list[str]:
    """Documents of very different lengths (1 to ~600 characters), with edge cases mixed in."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        length = rng.choice([1, 3, 10, 40, 120, 400])
        parts = [rng.choice(_WORDS) if rng.random() < 0.8 else rng.choice(_PUNCT) for _ in range(length // 2 + 1)]
        text = "".join(parts)[:length]
        docs.append(text if text.strip() else "字")  # blank records are counted as empty, not documents
    docs[5] = "文档里有字面上的<|endoftext|>和<|im_end|>，它们是文字。"
    docs[6] = "𠀀𪜀 emoji 👨‍👩‍👧‍👦 and tabs\tand\r\nCRLF  spaces   "
    docs[7] = "　　孔明笑曰：“吾料之久矣。”\n\n"
    return docs


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for text in docs:
            fh.write(json.dumps({field: text}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard_corpus")
    train, val = make_docs(400, 0), make_docs(60, 1)
    prepared = root / "prepared"
    prepared.mkdir()
    write_jsonl(prepared / "train.jsonl", train)
    write_jsonl(prepared / "val.jsonl", val)
    tok_dir = root / "tok"
    train_tokenizer([str(prepared)], tok_dir, vocab_size=400, progress=False)
    return {"root": root, "prepared": prepared, "train": train, "val": val, "tok_dir": tok_dir}


@pytest.fixture(scope="module")
def shards(corpus):
    out = corpus["root"] / "shards_w2"
    meta = tokenize_to_shards([str(corpus["prepared"])], corpus["tok_dir"], out, workers=2,
                              shard_tokens=SHARD_TOKENS, batch_size=16, progress=False)
    return out, meta


def shard_files(split_dir: Path) -> list[Path]:
    return sorted(split_dir.glob("shard_*.bin"))


# --------------------------------------------------------------------------------------------- writing


def test_every_document_is_in_the_shards_in_order(corpus, shards):
    out, meta = shards
    tok = load_tokenizer(corpus["tok_dir"])
    for split in ("train", "val"):
        expected = corpus[split]
        reader = TokenShards(out, split)
        assert reader.num_docs == len(expected) == meta["splits"][split]["documents"]
        decoded = []
        for index in range(reader.num_docs):
            ids = reader.document(index)
            assert ids[-1] == tok.eot_id
            assert tok.eot_id not in ids[:-1]  # literal "<|endoftext|>" text is text, not a boundary
            decoded.append(tok.decode(ids[:-1]))
        assert decoded == expected  # includes the last document of every shard and of the corpus
        assert reader.num_tokens == meta["splits"][split]["tokens"]
        expected_tokens = sum(len(tok.encode(t, allow_special=False)) + 1 for t in expected)
        assert reader.num_tokens == expected_tokens


def test_shards_close_after_the_document_that_crosses_the_target(corpus, shards):
    out, _ = shards
    files = shard_files(out / "train")
    assert len(files) > 3
    for i, bin_path in enumerate(files):
        sidecar = json.loads(bin_path.with_suffix(".json").read_text(encoding="utf-8"))
        tokens = np.fromfile(bin_path, dtype="<u2")
        assert sidecar["dtype"] == "uint16"
        assert sidecar["tokens"] == len(tokens)
        assert sidecar["documents"] == len(sidecar["document_offsets"])
        assert sidecar["document_offsets"][0] == 0
        assert sidecar["sources"] == [str(corpus["prepared"] / "train.jsonl")]
        offsets = sidecar["document_offsets"]
        # Each document's span ends with EOT, and the EOTs are exactly at the document ends.
        ends = offsets[1:] + [len(tokens)]
        assert np.array_equal(np.flatnonzero(tokens == 0), np.asarray(ends) - 1)
        if i < len(files) - 1:
            assert len(tokens) >= SHARD_TOKENS
            assert offsets[-1] < SHARD_TOKENS  # only the last document crossed the target
        else:
            assert len(tokens) > 0


def test_one_worker_and_two_workers_write_identical_shards(corpus, shards):
    out2, meta2 = shards
    out1 = corpus["root"] / "shards_w1"
    meta1 = tokenize_to_shards([str(corpus["prepared"])], corpus["tok_dir"], out1, workers=1,
                               shard_tokens=SHARD_TOKENS, batch_size=16, progress=False)
    for split in ("train", "val"):
        names1 = [p.name for p in sorted((out1 / split).iterdir())]
        names2 = [p.name for p in sorted((out2 / split).iterdir())]
        assert names1 == names2
        for name in names1:
            assert (out1 / split / name).read_bytes() == (out2 / split / name).read_bytes(), name
    volatile = {"wall_time_s", "tokens_per_s", "mb_per_s", "workers"}
    assert {k: v for k, v in meta1.items() if k not in volatile} == {k: v for k, v in meta2.items() if k not in volatile}
    assert (meta1["workers"], meta2["workers"]) == (1, 2)


def test_meta_records_tokenizer_counts_and_sources(corpus, shards):
    out, meta = shards
    on_disk = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert on_disk == meta
    tok = load_tokenizer(corpus["tok_dir"])
    assert meta["tokenizer"]["fingerprint"] == tok.fingerprint
    assert meta["tokenizer"]["vocab_size"] == tok.vocab_size
    assert meta["dtype"] == "uint16"
    assert set(meta["splits"]) == {"train", "val"}
    assert meta["documents"] == len(corpus["train"]) + len(corpus["val"])
    assert [s["split"] for s in meta["sources"]] == ["train", "val"]
    assert meta["malformed"] == 0 and meta["wall_time_s"] > 0
    assert (out / "config.yaml").is_file()


def test_txt_gz_inputs_malformed_records_and_split_name(corpus, tmp_path):
    docs = [d.replace("\n", " ").replace("\r", " ") for d in make_docs(50, 5)]
    txt = tmp_path / "lines.txt.gz"
    with gzip.open(txt, "wt", encoding="utf-8", newline="") as fh:
        fh.write("\r\n".join(docs[:25]) + "\r\n\r\n   \r\n" + "\n".join(docs[25:]))  # no final newline
    bad = tmp_path / "bad.jsonl"
    with open(bad, "wb") as fh:
        fh.write(b'{"body": "\xe5\xa5\xbd"}\n{oops\n{"body": 3}\n{"text": "x"}\n\xff\n{"body": ""}\n{"body": "\xe5\x90\x8e"}\n')
    out = tmp_path / "shards"
    meta = tokenize_to_shards([str(txt), str(bad)], corpus["tok_dir"], out, workers=1, field="body",
                              split="extra", progress=False)
    assert set(meta["splits"]) == {"extra"}
    tok = load_tokenizer(corpus["tok_dir"])
    reader = TokenShards(out, "extra")
    texts = [tok.decode(reader.document(i)[:-1]) for i in range(reader.num_docs)]
    assert texts == docs + ["好", "后"]
    assert meta["malformed"] == 4 and meta["empty_documents"] == 1
    lines = sorted((r["line"], r["reason"].split(":")[0].split(" (")[0]) for r in meta["malformed_records"])
    assert lines == [(2, "not valid JSON"), (3, "field 'body' is int, not text"), (4, "missing field 'body'"),
                     (5, "not UTF-8")]


def test_vocabularies_over_65536_use_uint32(corpus, tmp_path):
    assert dtype_for_vocab(65536) == np.dtype("<u2") and dtype_for_vocab(65537) == np.dtype("<u4")
    big = load_tokenizer(corpus["tok_dir"])
    big.tok.add_tokens([f"<x{i}>" for i in range(66000)] + ["巨大"])
    big.save(tmp_path / "big_tok")
    big = load_tokenizer(tmp_path / "big_tok")
    assert big.vocab_size > 65536
    docs = ["巨大的<x65999>和普通的字", "巨大"]
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    meta = tokenize_to_shards([str(src)], tmp_path / "big_tok", tmp_path / "shards", workers=1, progress=False)
    assert meta["dtype"] == "uint32"
    reader = TokenShards(tmp_path / "shards", expect_fingerprint=big)
    assert reader.read(0, reader.num_tokens).max() > 65535
    assert [big.decode(reader.document(i)[:-1]) for i in range(2)] == docs


def test_rerun_replaces_previous_shards(corpus, tmp_path):
    out = tmp_path / "again"
    tokenize_to_shards([str(corpus["prepared"])], corpus["tok_dir"], out, workers=1, shard_tokens=300,
                       progress=False)
    many = len(shard_files(out / "train"))
    tokenize_to_shards([str(corpus["prepared"])], corpus["tok_dir"], out, workers=1, progress=False)
    assert many > 1 and len(shard_files(out / "train")) == 1
    assert len(list((out / "train").glob("shard_*.json"))) == 1
    assert TokenShards(out).num_docs == len(corpus["train"])


def test_errors_before_work(corpus, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="not a tokenizer directory|tokenizer not found"):
        tokenize_to_shards([str(corpus["prepared"])], tmp_path / "no_tok", out)
    with pytest.raises(FileNotFoundError, match="input not found"):
        tokenize_to_shards([str(tmp_path / "missing.jsonl")], corpus["tok_dir"], out)
    with pytest.raises(ValueError, match="unsupported input"):
        resolve_inputs([str(corpus["tok_dir"] / "config.yaml")])
    assert not out.exists()
    with pytest.raises(XiaolmError, match="input not found"):
        tokenize_main([str(tmp_path / "missing.jsonl"), "--tokenizer", str(corpus["tok_dir"]), "--out", str(out)])


def test_cli(corpus, tmp_path, capsys):
    out = tmp_path / "cli"
    code = tokenize_main([str(corpus["prepared"]), "--tokenizer", str(corpus["tok_dir"]), "--out", str(out),
                          "--workers", "1", "--shard-tokens", "5000", "--no-progress"])
    assert code == 0
    err = capsys.readouterr().err
    assert "train: 400 documents" in err and "tokens/s" in err
    assert TokenShards(out, "val").num_docs == len(corpus["val"])
    with pytest.raises(SystemExit) as exc:
        tokenize_main(["--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--tokenizer", "--out", "--workers", "--shard-tokens", "--batch-size", "--field"):
        assert flag in help_text


# ---------------------------------------------------------------------------------------------- reader


@pytest.fixture(scope="module")
def reader(shards):
    return TokenShards(shards[0], "train")


def all_tokens(shard_dir: Path, split: str = "train") -> np.ndarray:
    return np.concatenate([np.fromfile(p, dtype="<u2") for p in shard_files(shard_dir / split)]).astype(np.int64)


def test_read_spans_shard_boundaries(shards, reader):
    flat = all_tokens(shards[0])
    assert reader.num_tokens == len(flat) and reader.num_shards > 3
    rng = np.random.default_rng(0)
    for _ in range(200):
        length = int(rng.integers(0, 3 * SHARD_TOKENS))
        start = int(rng.integers(0, len(flat) - length + 1))
        got = reader.read(start, length)
        assert got.dtype == np.int64
        assert np.array_equal(got, flat[start:start + length])
    assert np.array_equal(reader.read(0, len(flat)), flat)
    with pytest.raises(IndexError):
        reader.read(len(flat) - 5, 6)
    with pytest.raises(IndexError):
        reader.read(-1, 2)


def test_random_windows_and_sequential_pass(shards, reader):
    flat = all_tokens(shards[0])
    a = [reader.random_window(np.random.default_rng(3), 64) for _ in range(2)]
    assert np.array_equal(a[0], a[1])
    rng = np.random.default_rng(5)
    starts = {reader.random_start(rng, 64) for _ in range(300)}
    assert min(starts) >= 0 and max(starts) <= reader.num_tokens - 64 and len(starts) > 250
    windows = list(reader.iter_sequential(100))
    assert len(windows) == len(flat) // 100
    assert np.array_equal(np.concatenate(windows), flat[: len(windows) * 100])
    tail = list(reader.iter_sequential(100, drop_last=False))
    assert np.array_equal(np.concatenate(tail), flat)
    strided = list(reader.iter_sequential(100, stride=50))
    assert np.array_equal(strided[1][:50], strided[0][50:])
    with pytest.raises(ValueError):
        reader.random_window(rng, reader.num_tokens + 1)


def test_document_ids_for_attention_masks(shards, reader):
    flat = all_tokens(shards[0])
    eot_positions = np.flatnonzero(flat == 0)
    assert np.array_equal(reader.doc_starts, np.concatenate([[0], eot_positions[:-1] + 1]))
    ids = reader.doc_ids(0, len(flat))
    # The id goes up by one right after every EOT and nowhere else.
    assert np.array_equal(np.flatnonzero(np.diff(ids)), eot_positions[:-1])
    assert ids[0] == 0 and ids[-1] == reader.num_docs - 1
    start = int(reader.doc_starts[10]) - 3
    positions = reader.doc_positions(start, 8)
    assert positions[3] == 0 and positions[4] == 1 and positions[2] == positions[1] + 1
    assert np.array_equal(reader.doc_ids(start, 8)[[2, 3]], [9, 10])


def test_tokenizer_mismatch_is_refused_with_both_names(corpus, shards, tmp_path):
    out = shards[0]
    tok = load_tokenizer(corpus["tok_dir"])
    TokenShards(out, expect_fingerprint=tok.fingerprint)
    TokenShards(out, expect_fingerprint=tok)
    TokenShards(out, expect_fingerprint=corpus["tok_dir"])
    TokenShards(out, expect_fingerprint=str(corpus["tok_dir"]))
    other_dir = tmp_path / "other_tok"
    other = train_tokenizer([str(corpus["prepared"])], other_dir, vocab_size=380, progress=False)
    with pytest.raises(ShardMismatchError) as exc:
        TokenShards(out, expect_fingerprint=other_dir)
    message = str(exc.value)
    assert tok.fingerprint in message and other.fingerprint in message
    assert str(corpus["tok_dir"].resolve()) in message and str(other_dir) in message
    assert isinstance(exc.value, ValueError)


def test_reader_refuses_truncated_or_missing_data(shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shards[0], copy)
    with pytest.raises(ValueError, match="split 'test' has no shards"):
        TokenShards(copy, "test")
    victim = shard_files(copy / "train")[1]
    victim.write_bytes(victim.read_bytes()[:-2])
    with pytest.raises(ValueError, match="truncated"):
        TokenShards(copy)
    with pytest.raises(FileNotFoundError, match="not a shard directory"):
        TokenShards(tmp_path)


def test_reader_pickles_without_copying_tokens(reader):
    blob = pickle.dumps(reader)
    assert len(blob) < 1000
    clone = pickle.loads(blob)
    assert clone.num_tokens == reader.num_tokens
    assert np.array_equal(clone.read(100, 500), reader.read(100, 500))


def test_real_storybooks(shared_data, corpus, tmp_path):
    source = shared_data / "storybooks" / "stories_zh.jsonl"
    if not source.is_file():
        pytest.skip(f"{source} not present")
    texts = [json.loads(line)["text"] for line in open(source, encoding="utf-8") if line.strip()]
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    meta = tokenize_to_shards([str(source)], corpus["tok_dir"], tmp_path / "s", workers=2, shard_tokens=2000,
                              progress=False)
    tok = load_tokenizer(corpus["tok_dir"])
    reader = TokenShards(tmp_path / "s")
    assert meta["malformed"] == 0
    assert [tok.decode(reader.document(i)[:-1]) for i in range(reader.num_docs)] == texts
