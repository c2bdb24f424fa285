"""``xiaolm pipeline``: both routes end to end at tiny sizes, resumable by stage.

The story route runs on a local fixture in TinyStoriesChinese's exact layout; it is killed (SIGKILL) once SFT has
saved a checkpoint, then rerun: finished stages must not run again and SFT must continue from its checkpoint. The
general routes run through an offline twin of configs/general-zh.yaml (local files in each hf: dataset's layout) and
through configs/general-zh-local.yaml on ../shared/data.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from xiaolm.cli import main
from xiaolm.data.synth import generate_stories

REPO = Path(__file__).resolve().parents[1]
STORY_RECIPE = REPO / "configs" / "tinystories-zh.yaml"
SFT_STEPS = 60

# Tiny sizes for every stage: the route's plumbing is under test here, not model quality.
TINY_COMMON = [
    "--tokenizer.vocab-size", "512", "--tokenizer.max-train-mb", "5",
    "--pretrain.model.preset", "tiny", "--pretrain.model.seq-len", "128", "--pretrain.train.max-steps", "20",
    "--pretrain.train.micro-batch-size", "8", "--no-pretrain.train.compile", "--pretrain.train.loss-chunk-size", "0",
    "--pretrain.train.eval-every", "0", "--pretrain.train.save-every", "0", "--pretrain.train.warmup-steps", "2",
    "--pretrain.train.global-batch-tokens", "1024",
    "--pretrain.eval.eval-tokens", "2048", "--pretrain.eval.sample-tokens", "8",
    "--sft.train.micro-batch-size", "8", "--no-sft.train.compile", "--sft.train.warmup-steps", "2",
    "--sft.eval-conversations", "16", "--sft.sample-prompts", "1", "--sft.sample-tokens", "8",
    "--dpo.train.max-steps", "4", "--dpo.train.micro-batch-size", "4", "--dpo.eval-limit", "4",
    "--dpo.eval-max-new-tokens", "8", "--dpo.train.eval-every", "0",
    "--eval.ppl-tokens", "2048", "--eval.instruct-limit", "4", "--eval.max-new-tokens", "16",
    "--eval.questions", "你好", "天空为什么是蓝色的？", "--export.gguf-type", "f32",
]
STORY_TINY = TINY_COMMON + [
    "--instruct.limit", "300", "--instruct.heldout-fraction", "0.1",
    "--sft.train.max-steps", str(SFT_STEPS), "--sft.train.eval-every", "0", "--sft.train.save-every", "4",
    "--pairs.k", "2", "--pairs.min-margin", "0.0", "--pairs.limit", "12", "--pairs.sampling.max-new-tokens", "16",
    "--pairs.batch-size", "32",
]


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


def _plan(argv: list[str]) -> dict[str, dict]:
    """The dry-run plan of ``xiaolm pipeline ARGV`` as {stage: row}."""
    from xiaolm.config import parse_config
    from xiaolm.pipeline import PipelineConfig, run_pipeline

    cfg, _ = parse_config(PipelineConfig, argv, "xiaolm pipeline", "")
    return {r["stage"]: r for r in run_pipeline(cfg, dry_run=True)["plan"]}


FINISHED_BEFORE_SFT = {"prepare": "data/train.jsonl", "tokenizer": "tokenizer/tokenizer.json",
                       "tokenize": "shards/meta.json", "pretrain": "run/summary.json",
                       "instruct": "instruct/train.jsonl"}


@pytest.fixture(scope="module")
def story_route(tmp_path_factory):
    """The story route killed during SFT and rerun to the end: {"work", "argv", "after_kill", "mtimes"}."""
    root = tmp_path_factory.mktemp("story_route")
    data = _tinystories_fixture(root / "TinyStoriesChinese")
    work = root / "work"
    argv = ["--config", str(STORY_RECIPE), "--workdir", str(work), "--prepare.inputs", str(data), *STORY_TINY]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    log = open(root / "first.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "xiaolm", "pipeline", *argv], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=root)
    checkpoints = work / "sft" / "checkpoints"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if checkpoints.is_dir() and any(checkpoints.glob("step-*")):
            proc.send_signal(signal.SIGKILL)  # no chance to save anything more: a power cut, an OOM kill
            break
        time.sleep(0.02)
    proc.wait(60)
    log.close()
    assert proc.returncode == -signal.SIGKILL, (root / "first.log").read_text()[-3000:]
    sft_state = json.loads((work / "state" / "sft.json").read_text())
    assert sft_state["status"] == "running" and not (work / "sft" / "summary.json").exists()
    mtimes = {stage: (work / rel).stat().st_mtime_ns for stage, rel in FINISHED_BEFORE_SFT.items()}
    after_kill = _plan(argv)
    assert main(["pipeline", *argv]) == 0
    return {"work": work, "argv": argv, "after_kill": after_kill, "mtimes": mtimes}


def test_killed_during_sft_the_rerun_resumes_sft_and_reruns_nothing_finished(story_route):
    work, plan = story_route["work"], story_route["after_kill"]
    for stage in FINISHED_BEFORE_SFT:
        assert plan[stage]["action"] == "skip", plan[stage]
    assert plan["sft"]["action"] == "resume"
    assert plan["pairs"]["action"] == plan["align"]["action"] == "run"
    # The finished stages' outputs were not rewritten by the rerun.
    for stage, rel in FINISHED_BEFORE_SFT.items():
        assert (work / rel).stat().st_mtime_ns == story_route["mtimes"][stage], stage
    summary = json.loads((work / "sft" / "summary.json").read_text())
    assert summary["steps"] == SFT_STEPS and not summary["interrupted"]
    state = json.loads((work / "state" / "sft.json").read_text())
    assert state["status"] == "done" and state["attempts"] == 2
    # Resumed from the saved step, not restarted: the metrics log starts at step 1 once and carries on.
    steps = [json.loads(x)["step"] for x in (work / "sft" / "metrics.jsonl").read_text().splitlines()
             if json.loads(x).get("kind") == "train"]
    assert steps == sorted(steps) and steps[-1] == SFT_STEPS


def test_the_resumed_sft_equals_an_uninterrupted_one(story_route, tmp_path):
    """Exact resume: the same command without the kill ends at the same training loss."""
    work = story_route["work"]
    cfg = work / "configs" / "sft.yaml"
    assert main(["sft", str(work / "run"), "--config", str(cfg), "--out", str(tmp_path / "sft"),
                 "--no-progress"]) == 0
    fresh = json.loads((tmp_path / "sft" / "summary.json").read_text())
    resumed = json.loads((work / "sft" / "summary.json").read_text())
    assert fresh["steps"] == resumed["steps"] == SFT_STEPS
    assert fresh["final_train_loss"] == pytest.approx(resumed["final_train_loss"], rel=1e-5)


def test_story_route_report_card_and_exports(story_route):
    work = story_route["work"]
    report = json.loads((work / "report.json").read_text())
    assert report["complete"] and report["final_model"] == str(work / "dpo")
    for stage in ("prepare", "tokenizer", "tokenize", "pretrain", "instruct", "sft", "pairs", "align", "eval",
                  "export"):
        s = report["stages"][stage]
        assert s["status"] == "done" and s["wall_s"] is not None and s["command"].startswith("xiaolm "), stage
    assert report["stages"]["reward"]["status"] == "off"
    assert report["stages"]["pretrain"]["figures"]["val_bpc"] > 0
    assert report["stages"]["pretrain"]["device"] == "cpu" and report["stages"]["pretrain"]["tokens"] > 0
    ev = report["eval"]
    assert set(ev["ppl"]) == {"base", "dpo"} and all(p["bits_per_char"] > 0 for p in ev["ppl"].values())
    assert set(report["instruct"]) == {"sft", "dpo"}
    assert [q["question"] for q in ev["questions"]] == ["你好", "天空为什么是蓝色的？"]
    md = (work / "REPORT.md").read_text()
    for heading in ("## Headline figures", "## Stages", "## Instruction following: sft", "## Loss curves",
                    "## Reproduce each stage", "天空为什么是蓝色的？"):
        assert heading in md
    assert "![pretrain loss curve](run/loss_curve.png)" in md and (work / "run" / "loss_curve.png").is_file()
    assert "Not graded: set `eval.judge_endpoint` and `eval.judge_model`" in md    # how to get the judge's table
    assert "\ufffd" not in md                                                      # no broken characters
    # The exports load with their consumers' readers.
    from xiaolm.model.io import load_hf_llama

    model, tokenizer = load_hf_llama(work / "export" / "hf")
    assert sum(p.numel() for p in model.parameters()) > 0 and tokenizer.im_end_id is not None
    import gguf

    reader = gguf.GGUFReader(str(work / "export" / "model.gguf"))
    assert len(reader.tensors) > 0
    # Each stage's config replays with its own verb (the command the report names).
    from xiaolm.config import config_from_dict
    from xiaolm.train.sft import SFTConfig

    sft = config_from_dict(SFTConfig, yaml.safe_load((work / "configs" / "sft.yaml").read_text()))
    assert sft.train.max_steps == SFT_STEPS and sft.run == str(work / "run")


def test_a_rerun_skips_every_stage_and_a_changed_option_reruns_that_stage_and_after(story_route):
    argv = story_route["argv"]
    plan = _plan(argv)
    assert {r["action"] for s, r in plan.items() if s != "report"} <= {"skip", "off"}
    changed = _plan(argv + ["--sft.train.lr", "2e-3"])
    for stage in FINISHED_BEFORE_SFT:
        assert changed[stage]["action"] == "skip"
    for stage in ("sft", "pairs", "align", "eval", "export"):
        assert changed[stage]["action"] == "rerun", stage
    # An input file that changed reruns the route from its first reader.
    data_file = Path(argv[argv.index("--prepare.inputs") + 1]) / "data00_zh.jsonl"
    before = data_file.stat()
    os.utime(data_file, ns=(before.st_atime_ns, before.st_mtime_ns + 5_000_000_000))
    try:
        touched = _plan(argv)
        assert touched["prepare"]["action"] == "rerun" and touched["instruct"]["action"] == "rerun"
        assert touched["export"]["action"] == "rerun"
    finally:
        os.utime(data_file, ns=(before.st_atime_ns, before.st_mtime_ns))
    forced = _plan(argv + ["--stages", "eval", "export", "report"])
    assert forced["pretrain"]["action"] == "leave" and forced["eval"]["action"] == "skip"


def test_from_reruns_a_stage_and_everything_after(story_route, capsys):
    argv = story_route["argv"]
    from xiaolm.config import parse_config
    from xiaolm.pipeline import PipelineConfig, run_pipeline

    cfg, _ = parse_config(PipelineConfig, argv, "xiaolm pipeline", "")
    rows = {r["stage"]: r for r in run_pipeline(cfg, from_stage="eval", dry_run=True)["plan"]}
    assert rows["align"]["action"] == "leave" and rows["eval"]["action"] == "rerun"
    assert rows["export"]["action"] == "rerun"
    assert main(["pipeline", *argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "pipeline plan for" in out and "skip" in out


def test_bad_stage_names_are_one_line_errors(tmp_path, capsys):
    assert main(["pipeline", "--workdir", str(tmp_path), "--stages", "pretrian", "--dry-run"]) == 2
    assert "unknown stage(s) ['pretrian']" in capsys.readouterr().err
    assert main(["pipeline", "--workdir", str(tmp_path), "--from", "sfd", "--dry-run"]) == 2
    assert "--from sfd: not a stage" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ general routes


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _offline_twin(recipe: dict, root: Path) -> dict:
    """configs/general-zh.yaml with every hf: name replaced by a local file in that dataset's layout."""
    texts = [s["story_zh"] for s in generate_stories(400, seed=5)]
    for i, src in enumerate(recipe["mix"]):
        field = src["options"]["field"].split("|")[0]
        rows = [{field: t, "id": k} for k, t in enumerate(texts[i * 100 : (i + 1) * 100])]
        src["inputs"] = [_write_jsonl(root / "hf" / f"{src['name']}.jsonl", rows)]
        src["options"].pop("hf_config", None)
    for src in recipe["instruct_mix"]["sources"]:
        qa = [(f"讲一个故事，第{k}个。", texts[k]) for k in range(60)]
        if src["format"] == "alpaca":
            rows = [{"instruction": q, "input": "", "output": a} for q, a in qa]
        else:
            rows = [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a},
                                       {"from": "human", "value": "再讲一个。"}, {"from": "gpt", "value": a[:40]}]}
                    for q, a in qa]
        src["inputs"] = [_write_jsonl(root / "hf" / f"{src['name']}.jsonl", rows)]
    pairs = [{"conversations": [{"from": "human", "value": f"讲一个故事，第{k}个。"}],
              "chosen": {"from": "gpt", "value": texts[k]}, "rejected": {"from": "gpt", "value": "好的好的好的好的"}}
             for k in range(40)]
    recipe["pairs"]["data"] = [_write_jsonl(root / "hf" / "dpo.jsonl", pairs)]
    recipe["eval"]["mc_data"] = None
    return recipe


GENERAL_TINY = TINY_COMMON + [
    "--sft.seq-len", "128", "--sft.train.max-steps", "12", "--sft.train.eval-every", "0",
    "--sft.train.save-every", "0", "--dpo.seq-len", "128", "--pretrain.eval.prompts", "从前",
]


def test_general_zh_recipe_through_its_offline_twin(tmp_path):
    recipe = yaml.safe_load((REPO / "configs" / "general-zh.yaml").read_text(encoding="utf-8"))
    assert all(i.startswith("hf:") for s in recipe["mix"] for i in s["inputs"])
    twin = tmp_path / "general-zh-twin.yaml"
    twin.write_text(yaml.safe_dump(_offline_twin(recipe, tmp_path), allow_unicode=True), encoding="utf-8")
    work = tmp_path / "work"
    assert main(["pipeline", "--config", str(twin), "--workdir", str(work), *GENERAL_TINY, "--reward-model",
                 "--reward.train.max-steps", "3", "--reward.train.micro-batch-size", "4", "--reward.seq-len", "128",
                 "--reward.heldout-fraction", "0.2"]) == 0
    mixed = json.loads((work / "data" / "report.json").read_text())["mixture"]
    # Weights as stated: wikipedia 2.0 doubles its training documents, webnovel 0.5 keeps about half.
    assert mixed["wikipedia"]["train_docs"] == 2 * mixed["wikipedia"]["train_docs_in"]
    assert 0.25 < mixed["webnovel"]["train_docs"] / mixed["webnovel"]["train_docs_in"] < 0.75
    sft_mix = json.loads((work / "instruct" / "report.json").read_text())["mixture"]
    assert sft_mix["sharegpt"]["train"] > 1.5 * sft_mix["alpaca_zh"]["train"]  # weight 2.0 against 1.0
    report = json.loads((work / "report.json").read_text())
    assert report["complete"] and report["final_model"] == str(work / "dpo")
    assert report["stages"]["reward"]["status"] == "done"
    assert 0 <= report["stages"]["reward"]["figures"]["heldout_accuracy"] <= 1
    assert "reward model held-out pair accuracy" in (work / "REPORT.md").read_text()
    assert (work / "export" / "model.gguf").is_file() and (work / "export" / "hf" / "config.json").is_file()


def test_general_zh_local_recipe_at_tiny_size(shared_data, tmp_path):
    text = (REPO / "configs" / "general-zh-local.yaml").read_text(encoding="utf-8")
    recipe = yaml.safe_load(text.replace("../shared/data", str(shared_data)))
    for src in recipe["mix"]:
        src["max_docs"] = 200
        if src["name"] == "songci":  # one file of the 21 is plenty here
            src["inputs"] = [str(shared_data / "chinese_poetry" / "宋词" / "ci.song.0.json")]
    for src in recipe["instruct_mix"]["sources"]:
        src["max_conversations"] = 60
    path = tmp_path / "general-zh-local-tiny.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    work = tmp_path / "work"
    assert main(["pipeline", "--config", str(path), "--workdir", str(work), *GENERAL_TINY, "--no-prepare.dedup.near",
                 "--eval.mc-limit", "1", "--eval.mc-subjects", "marketing", "astronomy", "anatomy"]) == 0
    report = json.loads((work / "report.json").read_text())
    assert report["complete"]
    mc = report["eval"]["mc"]
    assert set(mc) == {"base", "dpo"} and mc["dpo"]["questions"] == 3 and mc["dpo"]["chance"] == 0.25
    assert "## Multiple choice" in (work / "REPORT.md").read_text()
    pairs = json.loads((work / "state" / "pairs.json").read_text())["result"]
    assert pairs["pairs"] == 300  # LLaMA-Factory's dpo_zh_demo, normalised


def test_mixing_weights_repeat_and_subsample_stably():
    from xiaolm.pipeline.mix import copies

    keys = [f"doc{i}" for i in range(4000)]
    assert sum(copies(k, 2.0) for k in keys) == 8000
    half = [k for k in keys if copies(k, 0.5)]
    assert 1800 < len(half) < 2200 and half == [k for k in keys if copies(k, 0.5)]
    assert 5800 < sum(copies(k, 1.5) for k in keys) < 6200
    assert sum(copies(k, 0.0) for k in keys) == 0
    with pytest.raises(ValueError):
        copies("x", -1.0)


def test_grpo_instead_of_dpo_reruns_only_alignment_and_after(story_route):
    """Switching the recipe's alignment to GRPO keeps every stage up to SFT (and the pairs stage is no longer
    asked for). Runs last in this module: it replaces the route's final model."""
    work, argv = story_route["work"], story_route["argv"]
    sft_mtime = (work / "sft" / "summary.json").stat().st_mtime_ns
    grpo = ["--align", "grpo", "--grpo.train.max-steps", "2", "--grpo.group-size", "2", "--grpo.prompts-per-step",
            "2", "--grpo.sampling.max-new-tokens", "8", "--grpo.eval-limit", "2", "--grpo.eval-max-new-tokens", "8",
            "--grpo.train.eval-every", "0"]
    plan = _plan(argv + grpo)
    assert plan["sft"]["action"] == "skip" and plan["pairs"]["action"] == "off"
    assert plan["align"]["action"] == "rerun" and plan["export"]["action"] == "rerun"
    assert main(["pipeline", *argv, *grpo]) == 0
    assert (work / "sft" / "summary.json").stat().st_mtime_ns == sft_mtime
    report = json.loads((work / "report.json").read_text())
    assert report["complete"] and report["final_model"] == str(work / "grpo")
    assert report["stages"]["align"]["command"].startswith(f"xiaolm grpo {work / 'sft'} --config")
    assert set(report["eval"]["ppl"]) == {"base", "grpo"}
    assert json.loads((work / "grpo" / "summary.json").read_text())["steps"] == 2
