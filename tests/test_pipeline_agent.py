"""``xiaolm pipeline``'s optional agent stage (``agent: sft | base``): tool data -> tool SFT -> GRPO with tools ->
eval tools, its figures in REPORT.md, and a rerun that skips it.

The route's earlier stages are left out (``--stages``): a tiny base with room for tool prompts (512 positions) is
pretrained once and named as ``pretrain.out``; the agent stages start from it (``agent: base``) at tiny budgets.
Quality is not under test here (bench/agent_table.py measures it); the plumbing is.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from xiaolm.cli import main

REPO = Path(__file__).resolve().parents[1]
AGENT_STAGES = ["agent_data", "agent_sft", "agent_grpo", "agent_eval"]
TINY_AGENT = [
    "--agent-data.train", "160", "--agent-data.heldout", "6", "--agent-data.kinds", "weekday", "lookup",
    "--agent-data.distractors", "0", "--agent-data.schemas", "brief", "--agent-data.thinking", "off",
    "--agent-sft.train.max-steps", "8", "--agent-sft.train.micro-batch-size", "8", "--agent-sft.train.lr", "3e-3",
    "--agent-sft.train.eval-every", "0", "--agent-sft.eval-conversations", "8", "--agent-sft.sample-prompts", "0",
    "--agent-sft.train.device", "cpu",
    "--agent-grpo.train.max-steps", "2", "--agent-grpo.group-size", "2", "--agent-grpo.prompts-per-step", "2",
    "--agent-grpo.train.micro-batch-size", "4", "--agent-grpo.sampling.max-new-tokens", "24",
    "--agent-grpo.max-turns", "2", "--agent-grpo.eval-limit", "2", "--agent-grpo.train.eval-every", "0",
    "--agent-grpo.train.lr", "1e-3", "--no-agent-grpo.enable-thinking", "--agent-grpo.train.device", "cpu",
    "--agent-eval.limit", "6", "--agent-eval.max-new-tokens", "24", "--agent-eval.max-turns", "2",
    "--no-agent-eval.enable-thinking", "--agent-eval.device", "cpu",
]


def _plan(argv: list[str], from_stage: str | None = None) -> dict[str, dict]:
    from xiaolm.config import parse_config
    from xiaolm.pipeline import PipelineConfig, run_pipeline

    cfg, _ = parse_config(PipelineConfig, argv, "xiaolm pipeline", "")
    return {r["stage"]: r for r in run_pipeline(cfg, from_stage, dry_run=True)["plan"]}


@pytest.fixture(scope="module")
def agent_route(tmp_path_factory, shards_dir):
    from conftest import TINY_PRETRAIN

    root = tmp_path_factory.mktemp("agent_route")
    base = root / "base"
    args = [a if a != "128" else "512" for a in TINY_PRETRAIN]
    assert main(["pretrain", "--data", str(shards_dir), "--out", str(base), "--max-steps", "4",
                 "--eval-every", "4", *args]) == 0
    work = root / "work"
    argv = ["--workdir", str(work), "--agent", "base", "--pretrain.out", str(base),
            "--stages", *AGENT_STAGES, "report", *TINY_AGENT]
    assert main(["pipeline", *argv]) == 0
    return {"work": work, "argv": argv, "base": base}


def test_agent_stages_are_off_unless_the_recipe_asks(tmp_path):
    for recipe in ("tinystories-zh.yaml", "general-zh-local.yaml"):
        argv = ["--config", str(REPO / "configs" / recipe), "--workdir", str(tmp_path / recipe)]
        plan = _plan(argv)
        assert all(plan[s]["action"] == "off" for s in AGENT_STAGES), recipe
        plan = _plan(argv + ["--agent", "sft"])
        assert all(plan[s]["action"] == "run" for s in AGENT_STAGES), recipe

    # the chain's wiring: tool SFT from the route's SFT model (or its base), GRPO with tools from the tool SFT model
    from xiaolm.config import parse_config
    from xiaolm.pipeline import PipelineConfig, wire

    argv = ["--config", str(REPO / "configs" / "tinystories-zh.yaml"), "--workdir", str(tmp_path / "w")]
    for agent, start in (("sft", "sft"), ("base", "run")):
        cfg = wire(parse_config(PipelineConfig, argv + ["--agent", agent], "xiaolm pipeline", "")[0])
        assert cfg.agent_sft.run == str(tmp_path / "w" / start)
        assert cfg.agent_sft.data == cfg.agent_grpo.prompts == [str(tmp_path / "w" / "agent" / "data")]
        assert cfg.agent_grpo.run == cfg.agent_sft.out == str(tmp_path / "w" / "agent" / "sft")
        assert cfg.agent_grpo.task == "tools"
        assert cfg.agent_grpo.eval_prompts == cfg.agent_eval.data == [str(tmp_path / "w" / "agent" / "data" /
                                                                          "heldout.jsonl")]


def test_agent_stage_writes_its_outputs_and_the_report_shows_the_eval(agent_route):
    work = agent_route["work"]
    for rel in ("agent/data/train.jsonl", "agent/data/heldout.jsonl", "agent/sft/summary.json",
                "agent/grpo/summary.json", "agent/eval/sft.json", "agent/eval/grpo.json", "agent/eval/eval.json"):
        assert (work / rel).is_file(), rel
    for stage in AGENT_STAGES:
        assert json.loads((work / "state" / f"{stage}.json").read_text())["status"] == "done", stage
    # the chain is wired: tool SFT starts from the base, GRPO from the tool SFT model, on the tool data
    grpo_cfg = (work / "configs" / "agent_grpo.yaml").read_text()
    assert "task: tools" in grpo_cfg and str(work / "agent" / "sft") in grpo_cfg
    assert json.loads((work / "agent" / "sft" / "summary.json").read_text())["steps"] == 8
    assert json.loads((work / "agent" / "grpo" / "summary.json").read_text())["steps"] == 2
    ev = json.loads((work / "agent" / "eval" / "eval.json").read_text())
    assert ev["models"] == {"sft": str(work / "agent" / "sft"), "grpo": str(work / "agent" / "grpo")}
    report = (work / "REPORT.md").read_text()
    section = report.split("## Tool use (agent stage)")[1].split("\n## ")[0]
    # every figure of the table is the eval's own number, for both models
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(r"^\| ([a-z ]+) \| (\S+) \| (\S+) \| (\S+) \|$",
                                                              section, re.M)}
    for label, key in (("valid calls", "valid_call_rate"), ("right function", "right_function_rate"),
                       ("exact arguments", "exact_argument_rate"), ("final answers with tools", "accuracy"),
                       ("final answers without tools", "accuracy_without_tools")):
        sft, grpo, diff = rows[label]
        assert sft == f"{100 * ev['sft'][key]:.1f}%" and grpo == f"{100 * ev['grpo'][key]:.1f}%", label
        assert diff == f"{100 * (ev['grpo'][key] - ev['sft'][key]):+.1f}", label
    assert f"on {ev['sft']['samples']} held-out tool tasks" in section and ev["sft"]["samples"] == 6
    assert (f"| tool use, GRPO with tools (6 held-out tasks) | answers {100 * ev['grpo']['accuracy']:.1f}% with tools, "
            f"{100 * ev['grpo']['accuracy_without_tools']:.1f}% without;") in report.split("## Stages")[0]
    assert json.loads((work / "report.json").read_text())["agent"] == ev


def test_the_agent_eval_is_eval_tools_on_the_heldout_split(agent_route, tmp_path):
    """The stage's figures are what `xiaolm eval tools` says of the GRPO model, run again by hand."""
    work = agent_route["work"]
    out = tmp_path / "again.json"
    heldout = work / "agent" / "data" / "heldout.jsonl"
    assert main(["eval", "tools", str(work / "agent" / "grpo"), "--data", str(heldout),
                 "--limit", "6", "--max-new-tokens", "24", "--max-turns", "2", "--no-enable-thinking",
                 "--device", "cpu", "--out", str(out)]) == 0
    again = json.loads(out.read_text())
    stored = json.loads((work / "agent" / "eval" / "eval.json").read_text())["grpo"]
    for key in ("samples", "valid_call_rate", "right_function_rate", "exact_argument_rate", "accuracy",
                "accuracy_without_tools", "reward"):
        assert stored[key] == again[key], key


def test_a_rerun_skips_the_agent_stages_and_a_changed_eval_reruns_only_it(agent_route):
    work, argv = agent_route["work"], agent_route["argv"]
    mtimes = {p: p.stat().st_mtime_ns for p in (work / "agent").rglob("*") if p.is_file()}
    assert main(["pipeline", *argv]) == 0
    for p, t in mtimes.items():
        assert p.stat().st_mtime_ns == t, p
    plan = _plan(argv)
    assert all(plan[s]["action"] == "skip" for s in AGENT_STAGES)
    plan = _plan(argv + ["--agent-eval.limit", "4"])
    assert [plan[s]["action"] for s in AGENT_STAGES] == ["skip", "skip", "skip", "rerun"]
    plan = _plan(argv + ["--agent-data.seed", "1"])
    assert all(plan[s]["action"] == "rerun" for s in AGENT_STAGES)
    plan = _plan(argv, from_stage="agent_grpo")
    assert [plan[s]["action"] for s in AGENT_STAGES] == ["leave", "leave", "rerun", "rerun"]


def test_report_section_puts_each_rate_in_its_row_and_column(tmp_path):
    """The report's table on an eval.json of distinct made-up rates: each lands in its own row and model column."""
    from types import SimpleNamespace

    from xiaolm.pipeline.agent import report_section

    cfg = SimpleNamespace(workdir=str(tmp_path), agent="sft")
    assert report_section(SimpleNamespace(workdir=str(tmp_path), agent="none")) == []
    assert "Not evaluated yet" in "\n".join(report_section(cfg))
    keys = ["valid_call_rate", "right_function_rate", "exact_argument_rate", "accuracy", "accuracy_without_tools"]
    sft = {k: 0.11 * (i + 1) for i, k in enumerate(keys)} | {"reward": 0.25, "samples": 50}
    grpo = {k: 0.05 + 0.1 * (i + 1) for i, k in enumerate(keys)} | {"reward": 0.5, "samples": 50}
    (tmp_path / "agent" / "eval").mkdir(parents=True)
    (tmp_path / "agent" / "eval" / "eval.json").write_text(json.dumps(
        {"data": ["h.jsonl"], "models": {"sft": "S", "grpo": "G"}, "sft": sft, "grpo": grpo}))
    text = "\n".join(report_section(cfg))
    assert "| valid calls | 11.0% | 15.0% | +4.0 |" in text
    assert "| right function | 22.0% | 25.0% | +3.0 |" in text
    assert "| exact arguments | 33.0% | 35.0% | +2.0 |" in text
    assert "| final answers with tools | 44.0% | 45.0% | +1.0 |" in text
    assert "| final answers without tools | 55.0% | 55.0% | +0.0 |" in text
    assert "| mean reward | 0.250 | 0.500 | +0.250 |" in text
    assert "on 50 held-out tool tasks" in text and "route's sft model" in text
    from xiaolm.pipeline.agent import headline_rows

    assert headline_rows(cfg) == ["| tool use, GRPO with tools (50 held-out tasks) | answers 45.0% with tools, 55.0% "
                                  "without; valid calls 15.0% (tool SFT: answers 44.0%, valid calls 11.0%) |"]
