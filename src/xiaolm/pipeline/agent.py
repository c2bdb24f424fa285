"""The route's optional agent stage (recipe knob ``agent: sft | base``; ``none``, the default, leaves it off).

Four pipeline stages, each the verb it replays, resumable and skippable like the others:

- ``agent_data``: ``xiaolm data tools`` into WORKDIR/agent/data (a training split and a held-out split that share no
  number or city);
- ``agent_sft``: ``xiaolm sft`` on that data, from the route's SFT model (``agent: sft``) or its pretrained base
  (``agent: base``), into WORKDIR/agent/sft;
- ``agent_grpo``: ``xiaolm grpo --task tools`` from the tool SFT model, tools run in the loop, into
  WORKDIR/agent/grpo;
- ``agent_eval``: ``xiaolm eval tools`` of both models on the held-out split (with the tools run, and without tools
  for contrast) into WORKDIR/agent/eval/eval.json, which REPORT.md shows (``report_section``).

The agent model is a branch of the route: ``export`` still writes the route's chat model; serve the tool model with
``xiaolm serve WORKDIR/agent/grpo``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from xiaolm.pipeline.figures import pct as _pct, read_json
from xiaolm.utils import atomic_write_json, log

AGENT_STAGES = ("agent_data", "agent_sft", "agent_grpo", "agent_eval")
AGENT_MODELS = ("sft", "grpo")  # the tool SFT model and its GRPO policy, compared in the report


def agent_on(cfg) -> bool:
    return cfg.agent != "none"


def heldout_file(cfg) -> str:
    return str(Path(cfg.agent_data.out) / "heldout.jsonl")


def eval_dir(cfg) -> Path:
    return Path(cfg.workdir) / "agent" / "eval"


def agent_runs(cfg) -> dict[str, str]:
    return {"sft": cfg.agent_sft.out, "grpo": cfg.agent_grpo.out}


def wire_agent(cfg) -> None:
    """Fill the agent sections' inputs and outputs where the recipe leaves them at their verbs' defaults."""
    from xiaolm.align.grpo import GRPOConfig
    from xiaolm.tasks.agent import ToolDataConfig
    from xiaolm.train.sft import SFTConfig

    w = Path(cfg.workdir) / "agent"
    if cfg.agent_data.out == ToolDataConfig().out:
        cfg.agent_data.out = str(w / "data")
    cfg.agent_sft.run = cfg.agent_sft.run or (cfg.pretrain.out if cfg.agent == "base" else cfg.sft.out)
    cfg.agent_sft.data = cfg.agent_sft.data or [cfg.agent_data.out]
    if cfg.agent_sft.out == SFTConfig().out:
        cfg.agent_sft.out = str(w / "sft")
    cfg.agent_grpo.task = "tools"  # the stage is GRPO with tools in the loop, whatever the section says
    cfg.agent_grpo.run = cfg.agent_grpo.run or cfg.agent_sft.out
    cfg.agent_grpo.prompts = cfg.agent_grpo.prompts or [cfg.agent_data.out]
    cfg.agent_grpo.eval_prompts = cfg.agent_grpo.eval_prompts or [heldout_file(cfg)]
    if cfg.agent_grpo.out == GRPOConfig().out:
        cfg.agent_grpo.out = str(w / "grpo")
    cfg.agent_eval.data = cfg.agent_eval.data or [heldout_file(cfg)]


def sft_upstream(cfg) -> list[str]:
    return ["agent_data", "pretrain" if cfg.agent == "base" else "sft"]


def run_agent_data(cfg, resume: bool) -> dict:
    from xiaolm.tasks.agent import build_tool_data

    return build_tool_data(cfg.agent_data)


def run_agent_sft(cfg, resume: bool) -> dict:
    from xiaolm.train.sft import sft

    cfg.agent_sft.train.resume = resume
    return sft(cfg.agent_sft)


def run_agent_grpo(cfg, resume: bool) -> dict:
    from xiaolm.align.grpo import grpo

    cfg.agent_grpo.train.resume = resume
    return grpo(cfg.agent_grpo)


def run_agent_eval(cfg, resume: bool) -> dict:
    """``xiaolm eval tools`` of the tool SFT model and the GRPO policy on the held-out split; each model's episodes
    go to WORKDIR/agent/eval/MODEL.json, the rates of both to eval.json."""
    from xiaolm.eval.tools import evaluate_tools

    out = eval_dir(cfg)
    result: dict = {"data": list(cfg.agent_eval.data), "models": agent_runs(cfg)}
    for name, run in agent_runs(cfg).items():
        section = dataclasses.replace(cfg.agent_eval, run=run, out=str(out / f"{name}.json"))
        r = evaluate_tools(section)
        result[name] = {k: v for k, v in r.items() if k != "episodes"}
        log(f"agent eval {name}: valid calls {_pct(r.get('valid_call_rate'))}, right function "
            f"{_pct(r.get('right_function_rate'))}, exact arguments {_pct(r.get('exact_argument_rate'))}, answers "
            f"{_pct(r.get('accuracy'))} with tools, {_pct(r.get('accuracy_without_tools'))} without")
    atomic_write_json(out / "eval.json", result)
    return result


def key_figures(name: str, r: dict) -> dict:
    """The few numbers of an agent stage for the report's stage table."""
    if name == "agent_data":
        return {k: r[k] for k in ("train_samples", "heldout_samples", "thinking_samples") if k in r}
    if name == "agent_sft":
        return {k: r[k] for k in ("steps", "tokens", "val_loss", "final_train_loss") if k in r}
    if name == "agent_grpo":
        return {k: r[k] for k in ("steps", "val_accuracy", "val_valid_call_rate", "val_reward") if k in r}
    if name == "agent_eval":
        return {f"{m} answers": r[m]["accuracy"] for m in AGENT_MODELS if isinstance(r.get(m), dict)
                and "accuracy" in r[m]}
    return {}


# --------------------------------------------------------------------------------------------------- report

ROWS = (("valid calls", "valid_call_rate"), ("right function", "right_function_rate"),
        ("exact arguments", "exact_argument_rate"), ("final answers with tools", "accuracy"),
        ("final answers without tools", "accuracy_without_tools"), ("mean reward", "reward"))


def _points(a, b) -> str:
    return "-" if a is None or b is None else f"{100 * (b - a):+.1f}"


def _eval(cfg):
    return read_json(eval_dir(cfg) / "eval.json")


def headline_rows(cfg) -> list[str]:
    """The report's headline row for the agent stage: the GRPO policy's held-out answers with and without tools."""
    ev = _eval(cfg) if agent_on(cfg) else None
    if not ev:
        return []
    sft, grpo = ev.get("sft") or {}, ev.get("grpo") or {}
    return [f"| tool use, GRPO with tools ({grpo.get('samples')} held-out tasks) | answers "
            f"{_pct(grpo.get('accuracy'))} with tools, {_pct(grpo.get('accuracy_without_tools'))} without; valid calls "
            f"{_pct(grpo.get('valid_call_rate'))} (tool SFT: answers {_pct(sft.get('accuracy'))}, valid calls "
            f"{_pct(sft.get('valid_call_rate'))}) |"]


def report_section(cfg) -> list[str]:
    """REPORT.md's agent section: the eval's rates of the tool SFT model and the GRPO policy side by side."""
    if not agent_on(cfg):
        return []
    L = ["", "## Tool use (agent stage)", ""]
    ev = _eval(cfg)
    if not ev:
        return L + ["Not evaluated yet: the agent stages have not finished (rerun the same command to continue)."]
    sft, grpo = ev.get("sft") or {}, ev.get("grpo") or {}
    n = sft.get("samples") or grpo.get("samples")
    L += [f"`xiaolm eval tools` on {n} held-out tool tasks (`{', '.join(ev.get('data') or [])}`; greedy, the tools "
          f"run in the sandbox; without tools: the same questions, no tools offered, one turn). The tool SFT model "
          f"is `{ev['models']['sft']}` (from the route's {cfg.agent} model), the GRPO policy `{ev['models']['grpo']}`.",
          "", "| held-out rate | tool SFT | GRPO with tools | GRPO - SFT (points) |", "|---|---|---|---|"]
    for label, key in ROWS:
        a, b = sft.get(key), grpo.get(key)
        if key == "reward":
            L.append(f"| {label} | {'-' if a is None else f'{a:.3f}'} | {'-' if b is None else f'{b:.3f}'} | "
                     f"{'-' if a is None or b is None else f'{b - a:+.3f}'} |")
        else:
            L.append(f"| {label} | {_pct(a)} | {_pct(b)} | {_points(a, b)} |")
    by_sft, by_grpo = sft.get("accuracy_by_kind") or {}, grpo.get("accuracy_by_kind") or {}
    kinds = sorted(set(by_sft) | set(by_grpo))
    if kinds:
        L.append("\nFinal answers with tools by task kind, tool SFT → GRPO: " + "; ".join(
            f"{k} {_pct(by_sft.get(k))} → {_pct(by_grpo.get(k))}" for k in kinds) + ".")
    if n:
        L.append(f"\nOne held-out task is {100 / n:.1f} points; with {n} tasks a difference under about "
                 f"{200 * (0.25 / n) ** 0.5:.0f} points is within two standard errors. Episodes: "
                 f"`{eval_dir(cfg) / 'sft.json'}`, `{eval_dir(cfg) / 'grpo.json'}`. Serve the tool model: "
                 f"`xiaolm serve {ev['models']['grpo']}`.")
    return L
