"""The README's main command, end to end, with a shorter budget: the model writes recognisable stories."""
from __future__ import annotations

import json

from xiaolm.cli import main


def test_quickstart_trains_a_model_that_beats_the_unigram_baseline(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--stories", "3000", "--max-steps", "150",
                 "--max-new-tokens", "40", "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "Stories written by your model" in printed and "Validation curve" in printed
    result = json.loads((out / "quickstart.json").read_text())
    # Far below the loss of a model that ignores context: the model has learned the stories' structure.
    assert result["val_loss"] < result["unigram_entropy"] - 1.0, result
    evals = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in x]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    # Every opening got a continuation, and the stories are mostly Chinese text.
    for story in result["stories"]:
        han = sum("\u4e00" <= c <= "\u9fff" for c in story)
        assert han >= 10, story
    for name in ("stories.jsonl", "data/report.json", "tokenizer/tokenizer.json", "shards/meta.json",
                 "run/report.md", "run/loss_curve.png", "quickstart.yaml"):
        assert (out / name).exists(), name
