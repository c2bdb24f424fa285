"""The TinyStoriesChinese recipe runs end to end on a local fixture in that dataset's exact layout."""
from __future__ import annotations

import json
from pathlib import Path

from xiaolm.cli import main
from xiaolm.data.synth import generate_stories

REPO = Path(__file__).resolve().parents[1]


def _tinystories_fixture(folder: Path, n_files: int = 2, per_file: int = 150) -> Path:
    """data00_zh.jsonl ... in TinyStoriesChinese's layout (note the key "prompt:" with a colon)."""
    folder.mkdir(parents=True)
    stories = generate_stories(n_files * per_file, seed=11)
    for i in range(n_files):
        with open(folder / f"data{i:02d}_zh.jsonl", "w", encoding="utf-8") as fh:
            for s in stories[i * per_file : (i + 1) * per_file]:
                rec = {"story": "Once upon a time...", "instruction": {
                    "prompt:": "Write a short story (3-5 paragraphs) which only uses very simple words...",
                    "words": ["hang", "foot", "cute"], "features": ["Dialogue"]},
                    "summary": "A story.", "source": "GPT-4", "story_zh": s["story_zh"]}
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return folder


def test_tinystories_recipe_on_local_files(tmp_path):
    data = _tinystories_fixture(tmp_path / "TinyStoriesChinese")
    work = tmp_path / "work"
    assert main([
        "pipeline", "--config", str(REPO / "configs" / "tinystories-zh.yaml"), "--workdir", str(work),
        "--prepare.inputs", str(data), "--tokenizer.vocab-size", "512", "--no-tokenizer.progress",
        "--no-tokenize.progress",
        "--pretrain.model.preset", "tiny", "--pretrain.model.seq-len", "64", "--pretrain.train.max-tokens", "4096",
        "--pretrain.train.micro-batch-size", "4", "--pretrain.train.global-batch-tokens", "512",
        "--no-pretrain.train.compile", "--pretrain.train.loss-chunk-size", "0",
        "--pretrain.train.eval-every", "0", "--pretrain.train.warmup-steps", "2",
        "--pretrain.eval.eval-tokens", "1024", "--pretrain.eval.sample-tokens", "4",
        "--no-pretrain.train.progress",
    ]) == 0
    report = json.loads((work / "data" / "report.json").read_text())
    assert report["documents_in"] == 300 and report["documents_kept"] > 250
    assert (work / "tokenizer" / "tokenizer.json").is_file()
    meta = json.loads((work / "shards" / "meta.json").read_text())
    assert meta["splits"]["train"]["documents"] > 200
    summary = json.loads((work / "run" / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["tokens"] == 4096
    # Every stage recorded its resolved options; the whole route too.
    assert "story_zh" in (work / "pipeline.yaml").read_text()
    assert (work / "run" / "config.yaml").is_file()
