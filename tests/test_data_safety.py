"""Data that cannot break a run: token ids beyond the vocabulary are caught when shards are opened (and by
``xiaolm data verify``), a truncated .gz is reported and skipped, tokenising nothing is an error, and SFT/DPO say
how many records or pairs they dropped."""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from xiaolm.cli import main
from xiaolm.data.shards import TokenShards
from xiaolm.utils import write_jsonl

from conftest import TINY_PRETRAIN


def _one_line_error(capsys, argv) -> str:
    code = main(argv)
    assert code not in (0, None)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith("xiaolm: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _poison(shard_dir: Path, value: int) -> Path:
    """Write one out-of-vocabulary id into the first training shard (as a damaged or foreign shard would hold)."""
    bin_path = sorted((shard_dir / "train").glob("shard_*.bin"))[0]
    data = np.fromfile(bin_path, dtype="<u2")
    data[10] = value
    data.tofile(bin_path)
    return bin_path


# --------------------------------------------------------------------------------- ids beyond the vocabulary


def test_sidecars_record_the_id_range_and_checksum(shards_dir):
    import hashlib

    for sidecar in sorted((shards_dir / "train").glob("shard_*.json")):
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        data = np.fromfile(sidecar.with_suffix(".bin"), dtype="<u2")
        assert (meta["min_id"], meta["max_id"]) == (int(data.min()), int(data.max()))
        assert meta["sha256"] == hashlib.sha256(sidecar.with_suffix(".bin").read_bytes()).hexdigest()


def test_ids_beyond_the_vocabulary_are_refused_when_shards_open(shards_dir, tmp_path, capsys):
    shards = tmp_path / "shards"
    shutil.copytree(shards_dir, shards)
    # An old sidecar without an id range: the reader scans the shard.
    bin_path = _poison(shards, 1030)
    sidecar = bin_path.with_suffix(".json")
    meta = json.loads(sidecar.read_text(encoding="utf-8"))
    for key in ("min_id", "max_id", "sha256"):
        meta.pop(key, None)
    sidecar.write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(ValueError, match=r"shard_00000\.bin.*1030.*vocabulary of 1024"):
        TokenShards(shards, "train")
    # A sidecar whose recorded range is beyond the vocabulary is refused without reading the shard.
    meta["max_id"], meta["min_id"] = 1030, 0
    sidecar.write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(ValueError, match="1030"):
        TokenShards(shards, "train")
    # Pretraining on them is one line, not an IndexError from the embedding.
    line = _one_line_error(capsys, ["pretrain", "--data", str(shards), "--out", str(tmp_path / "run"),
                                    *TINY_PRETRAIN, "--max-steps", "2"])
    assert "1030" in line and "xiaolm data verify" in line


def test_data_verify_checks_checksums_and_ids(shards_dir, tmp_path, capsys):
    assert main(["data", "verify", str(shards_dir)]) == 0
    assert "ok" in capsys.readouterr().err
    shards = tmp_path / "shards"
    shutil.copytree(shards_dir, shards)
    bin_path = _poison(shards, 2000)  # damaged after writing: the sidecar's range still looks fine
    TokenShards(shards, "train")  # the cheap check at open cannot see it ...
    code = main(["data", "verify", str(shards)])  # ... the checksum can
    assert code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"{bin_path}" in err and "sha256" in err and "2000" in err, err
    code = main(["data", "verify", str(tmp_path / "nothing")])
    assert code == 2


# ---------------------------------------------------------------------------------------------- tokenize


def test_tokenize_reports_a_truncated_gz_and_goes_on(tokenizer_dir, tmp_path, capsys):
    docs = [{"text": f"第{i}个故事：小猫和小狗在公园里玩。" * 3} for i in range(400)]
    whole = tmp_path / "whole.jsonl.gz"
    with gzip.open(whole, "wt", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    good = write_jsonl(tmp_path / "good.jsonl", docs[:20]) and tmp_path / "good.jsonl"
    out = tmp_path / "shards"
    assert main(["data", "tokenize", str(cut), str(good), "--tokenizer", str(tokenizer_dir), "--out", str(out),
                 "--workers", "1", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(cut) in err and "unreadable" in err, err
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert any(r["file"] == str(cut) and "unreadable" in r["reason"] for r in meta["malformed_records"])
    assert 20 < meta["documents"] < 420  # the readable part of the cut file and all of the good one


def test_tokenize_that_writes_no_tokens_is_an_error(tokenizer_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{oops\n{"body": "字"}\n\n', encoding="utf-8")
    line = _one_line_error(capsys, ["data", "tokenize", str(bad), "--tokenizer", str(tokenizer_dir),
                                    "--out", str(tmp_path / "shards"), "--workers", "1", "--no-progress"])
    assert "no tokens" in line and "2 malformed" in line and f"{bad}:1" in line, line


# ------------------------------------------------------------------------------------- SFT and DPO reports


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, shards_dir) -> Path:
    out = tmp_path_factory.mktemp("base_run") / "run"
    assert main(["pretrain", "--data", str(shards_dir), "--out", str(out), *TINY_PRETRAIN, "--max-steps", "2",
                 "--eval-every", "0", "--eval-tokens", "1024", "--sample-tokens", "0"]) == 0
    return out


QUIET = ["--no-progress", "--no-tensorboard", "--device", "cpu", "--micro-batch-size", "4", "--max-steps", "1",
         "--eval-every", "0"]


def test_sft_says_how_many_records_were_bad_and_where_all_are_listed(base_run, tmp_path, capsys):
    lines = []
    for i in range(30):
        lines.append(json.dumps({"messages": [{"role": "user", "content": f"讲第{i}个故事。"},
                                              {"role": "assistant", "content": "从前有一只小猫。"}]},
                                ensure_ascii=False))
        if i < 12:
            lines.append("{not json %d" % i)
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "sft"
    assert main(["sft", str(base_run), "--data", str(data), "--out", str(out), "--sample-prompts", "0",
                 *QUIET]) == 0
    err = capsys.readouterr().err
    listing = out / "bad_records.txt"
    assert "12 malformed" in err and str(listing) in err, err
    listed = listing.read_text(encoding="utf-8").splitlines()
    assert len(listed) == 12 and all(f"{data}:" in x for x in listed)


def test_dpo_says_how_many_over_length_pairs_it_dropped(base_run, tmp_path, capsys):
    pairs = []
    for i in range(24):
        prompt = "很长的问题" * 60 if i % 3 == 0 else f"第{i}个问题？"  # every third prompt alone overflows
        pairs.append({"prompt": [{"role": "user", "content": prompt}], "chosen": "好的故事。",
                      "rejected": "小猫小猫小猫"})
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs) and tmp_path / "pairs.jsonl"
    out = tmp_path / "dpo"
    assert main(["dpo", str(base_run), "--data", str(data), "--out", str(out), "--seq-len", "64",
                 "--heldout-fraction", "0.2", *QUIET]) == 0
    err = capsys.readouterr().err
    dropped = [x for x in err.splitlines() if "dropped" in x and "--seq-len 64" in x]
    assert dropped, err
    counted = sum(int(x.split("note: ")[1].split(" ")[0]) for x in dropped)
    assert counted == 8, dropped
