"""The README's main command, end to end, with a shorter budget: the model writes recognisable stories."""
from __future__ import annotations

import json

import pytest

from xiaolm.cli import main


def test_quickstart_trains_a_model_that_beats_the_unigram_baseline(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--stories", "2000", "--max-steps", "60",
                 "--max-new-tokens", "40", "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "Stories written by your model" in printed and "Validation curve" in printed
    assert f"xiaolm eval judge {out / 'run'} --endpoint URL --model NAME" in printed   # how to get grades
    result = json.loads((out / "quickstart.json").read_text())
    # Far below the loss of a model that ignores context: the model has learned the stories' structure.
    assert result["val_loss"] < result["unigram_entropy"] - 1.0, result
    evals = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in x]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    # Every opening got a continuation, and the stories are mostly Chinese text (after 60 steps a continuation may be
    # one short sentence before the model ends the story: measured "小军没有在意。").
    han = [sum("\u4e00" <= c <= "\u9fff" for c in story) for story in result["stories"]]
    visible = sum(len("".join(s.split())) for s in result["stories"])
    assert min(han) >= 5 and sum(han) >= 0.7 * visible, result["stories"]
    # the printed repetition figures are the stories' own (an empty or looping story would show)
    from xiaolm.tasks.constraints import aggregate_repetition, repetition_metrics

    rep = aggregate_repetition([repetition_metrics(t) for t in result["stories"]])
    assert result["repetition"]["rep4"] == pytest.approx(rep["rep4"]) and 0 <= rep["rep4"] < 0.5
    assert f"rep-4 {rep['rep4']:.3f}" in printed and f"distinct-2 {rep['distinct2']:.3f}" in printed
    for name in ("stories.jsonl", "data/report.json", "tokenizer/tokenizer.json", "shards/meta.json",
                 "run/report.md", "run/loss_curve.png", "quickstart.yaml"):
        assert (out / name).exists(), name


def _force_gpu_defaults(monkeypatch):
    """The quickstart takes its GPU defaults (200k stories, 8k vocabulary, 512 context, lr 2e-3, a time budget
    sized by calibration) while the model still runs on the CPU: the route only a GPU takes, exercised in CI."""
    import xiaolm.quickstart as qs

    real = qs.resolve
    monkeypatch.setattr(qs, "pick_device", lambda pref="auto": "cpu")
    monkeypatch.setattr(qs, "resolve", lambda cfg, device: real(cfg, "cuda"))
    return qs


def _check_gpu_route(out, stories: int):
    import yaml

    cfg = yaml.safe_load((out / "quickstart.yaml").read_text())
    assert (cfg["stories"], cfg["vocab_size"], cfg["seq_len"], cfg["lr"]) == (stories, 8192, 512, 2e-3)
    run_cfg = yaml.safe_load((out / "run" / "config.yaml").read_text())
    assert run_cfg["model"]["seq_len"] == 512 and run_cfg["train"]["device"] == "cpu"
    assert run_cfg["train"]["max_steps"] >= 20            # sized by the calibration, not given
    assert sum(1 for _ in open(out / "stories.jsonl", encoding="utf-8")) == stories
    result = json.loads((out / "quickstart.json").read_text())
    assert len(result["stories"]) == 5 and result["val_loss"] == result["val_loss"]


def test_quickstart_gpu_defaults_run_end_to_end_on_cpu(tmp_path, monkeypatch):
    """GPU defaults with a tiny model, fewer stories and a short budget (the full 200k under -m slow)."""
    _force_gpu_defaults(monkeypatch)
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--stories", "4000", "--preset", "tiny", "--micro-batch-size", "8",
                 "--time-budget", "8", "--max-new-tokens", "24", "--workers", "2"]) == 0
    _check_gpu_route(out, 4000)


@pytest.mark.slow
def test_quickstart_gpu_defaults_with_200k_stories_on_cpu(tmp_path, monkeypatch):
    """All the GPU corpus: 200,000 stories of seed 0 (the synth used to die at story 107,383 here)."""
    _force_gpu_defaults(monkeypatch)
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--preset", "tiny", "--micro-batch-size", "8",
                 "--time-budget", "8", "--max-new-tokens", "24", "--workers", "2"]) == 0
    _check_gpu_route(out, 200_000)
