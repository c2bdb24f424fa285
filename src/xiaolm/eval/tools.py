"""``xiaolm eval tools``: does the model call the right tool with the right arguments, and answer right?

On held-out tool tasks (``xiaolm data tools``, its ``heldout.jsonl``), greedy episodes with the tools run in the
sandbox (``xiaolm.infer.agent.run_episodes``):

- ``valid_call_rate``: episodes that made at least one call, every call parsing (JSON with a name and an object of
  arguments);
- ``right_function_rate``: episodes whose first call names the reference's first function;
- ``exact_argument_rate``: episodes whose calls equal the reference calls, names and arguments (order-free);
- ``accuracy``: final answers the task's checker accepts; ``reward``: the mean GRPO reward (checker + format term);
- ``accuracy_without_tools`` (the contrast): the same questions asked with no tools offered, one turn.

On glaive-layout data (``--glaive FILE``: ShareGPT with ``function_call`` turns), the first call the model makes
for each conversation's first request is compared with the reference call: ``function_name_accuracy`` and
``argument_key_accuracy`` (the same set of argument names).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Optional

from xiaolm.config import opt, parse_config
from xiaolm.utils import atomic_write_json, fail


@dataclass
class EvalToolsConfig:
    """Score tool use on held-out tool tasks (valid calls, right function, exact arguments, final answers with the \
tools run, and without tools for contrast), and function-name / argument-key accuracy on glaive-layout data."""

    run: str = opt(None, "the model: RUNDIR, checkpoint, or Hugging Face directory")
    data: list[str] = opt([], "held-out tool tasks: heldout.jsonl from `xiaolm data tools`")
    glaive: list[str] = opt([], "glaive / LLaMA-Factory ShareGPT files with function_call turns")
    out: Optional[str] = opt(None, "write the result JSON here")
    limit: Optional[int] = opt(200, "use only the first N samples of each source")
    max_turns: int = opt(4, "assistant turns per episode at most")
    max_new_tokens: int = opt(160, "tokens per assistant turn at most")
    enable_thinking: Optional[bool] = opt(None, "the thinking switch of the prompt (unset: the model decides)")
    contrast: bool = opt(True, "also ask the questions without tools")
    batch_size: int = opt(32, "episodes generated together")
    device: str = opt("auto", "auto, cpu, cuda or mps")
    checkpoint: str = opt("latest", "which checkpoint of a RUNDIR: latest or best")


def _canonical(calls: list[dict]) -> list[str]:
    return sorted(json.dumps({"name": c["name"], "arguments": c["arguments"]}, ensure_ascii=False, sort_keys=True)
                  for c in calls)


def tool_metrics(model, tokenizer, prompts: list[dict], max_new_tokens: int = 160, max_turns: int = 4,
                 enable_thinking: Optional[bool] = None, contrast: bool = True, batch_size: int = 32,
                 keep: bool = False) -> dict:
    """The tool-task metrics (module docstring) of ``prompts`` (``xiaolm.tasks.agent.load_tool_prompts``)."""
    from xiaolm.infer.agent import run_episodes
    from xiaolm.tasks.agent import check_answer, reward
    from xiaolm.tasks.toolbox import call_tool
    from xiaolm.tokenizer.chat import prompt_ids

    if not prompts:
        return {}
    ids = [prompt_ids(tokenizer, p["prompt"], p["tools"], enable_thinking) for p in prompts]
    episodes = run_episodes(model, tokenizer, ids, call_tool, enable_thinking=enable_thinking, max_turns=max_turns,
                            max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size)
    n = len(prompts)
    valid = right = exact = correct = 0
    total_reward = 0.0
    kinds: dict[str, list[int]] = {}
    for p, e in zip(prompts, episodes):
        task = p["task"]
        ref = task.get("calls") or []
        valid += bool(e.calls) and not e.errors
        right += bool(e.calls) and bool(ref) and e.calls[0]["name"] == ref[0]["name"]
        exact += bool(e.calls) and _canonical(e.calls) == _canonical(ref)
        ok = e.final is not None and check_answer(task, e.final)
        correct += ok
        total_reward += reward(task, e.final, e.calls, len(e.errors))
        kinds.setdefault(task.get("kind", "?"), []).append(int(ok))
    out = {"samples": n, "valid_call_rate": valid / n, "right_function_rate": right / n,
           "exact_argument_rate": exact / n, "accuracy": correct / n, "reward": total_reward / n,
           "accuracy_by_kind": {k: sum(v) / len(v) for k, v in sorted(kinds.items())},
           "ended": {k: sum(e.ended == k for e in episodes) for k in ("answered", "malformed", "turn_limit", "length")}}
    if contrast:
        plain = [prompt_ids(tokenizer, [m for m in p["prompt"] if m["role"] == "user"], None, enable_thinking)
                 for p in prompts]
        answers = run_episodes(model, tokenizer, plain, lambda name, args: "error: no tools here",
                               enable_thinking=enable_thinking, max_turns=1, max_new_tokens=max_new_tokens,
                               temperature=0.0, batch_size=batch_size)
        out["accuracy_without_tools"] = sum(
            a.final is not None and check_answer(p["task"], a.final) for p, a in zip(prompts, answers)) / n
    if keep:
        out["episodes"] = [{"question": p["task"]["question"], "turns": e.turns, "results": e.results,
                            "final": e.final, "ended": e.ended} for p, e in zip(prompts, episodes)]
    return out


def glaive_metrics(model, tokenizer, conversations: list, max_new_tokens: int = 160, batch_size: int = 32) -> dict:
    """Function-name and argument-key accuracy of the first call, on conversations with reference calls."""
    from xiaolm.infer.agent import run_episodes
    from xiaolm.tokenizer.chat import prompt_ids

    cases = []
    for c in conversations:
        k = next((i for i, m in enumerate(c.messages) if m["role"] == "assistant" and m.get("tool_calls")), None)
        if k is None:
            continue
        ref = c.messages[k]["tool_calls"][0]["function"]
        cases.append((prompt_ids(tokenizer, c.messages[:k], c.tools), ref))
    if not cases:
        return {"glaive_conversations": 0}
    episodes = run_episodes(model, tokenizer, [ids for ids, _ in cases], lambda name, args: "", max_turns=1,
                            max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size)
    names = keys = 0
    for (_ids, ref), e in zip(cases, episodes):
        if e.calls:
            names += e.calls[0]["name"] == ref["name"]
            keys += e.calls[0]["name"] == ref["name"] and set(e.calls[0]["arguments"]) == set(ref["arguments"])
    return {"glaive_conversations": len(cases), "function_name_accuracy": names / len(cases),
            "argument_key_accuracy": keys / len(cases)}


def evaluate_tools(cfg: EvalToolsConfig) -> dict:
    from xiaolm.data.formats import load_conversations
    from xiaolm.model.io import CheckpointError, load_model
    from xiaolm.utils import pick_device
    from xiaolm.tasks.agent import load_tool_prompts

    if not cfg.run:
        raise fail("give the model: xiaolm eval tools RUNDIR --data DIR/heldout.jsonl")
    if not cfg.data and not cfg.glaive:
        raise fail("--data (held-out tool tasks from xiaolm data tools) or --glaive FILE is required")
    try:
        model, tokenizer, _ = load_model(cfg.run, device=pick_device(cfg.device), which=cfg.checkpoint)
    except CheckpointError as exc:
        raise fail(str(exc))
    result: dict = {"run": str(cfg.run)}
    if cfg.data:
        prompts, _ = load_tool_prompts(cfg.data, limit=cfg.limit, refuse_heldout=False)
        result.update(tool_metrics(model, tokenizer, prompts, cfg.max_new_tokens, cfg.max_turns,
                                   cfg.enable_thinking, cfg.contrast, cfg.batch_size, keep=bool(cfg.out)))
    if cfg.glaive:
        convs, _reports = load_conversations(cfg.glaive)
        result.update(glaive_metrics(model, tokenizer, convs[: cfg.limit] if cfg.limit else convs,
                                     cfg.max_new_tokens, cfg.batch_size))
    if cfg.out:
        atomic_write_json(cfg.out, result)
    return result


def main(argv: list[str]) -> int:
    cfg, _ = parse_config(EvalToolsConfig, argv, "xiaolm eval tools", positionals={"run": "RUNDIR"})
    r = evaluate_tools(cfg)
    if "samples" in r:
        line = (f"{r['samples']} held-out tool tasks: valid calls {100 * r['valid_call_rate']:.1f}%, right function "
                f"{100 * r['right_function_rate']:.1f}%, exact arguments {100 * r['exact_argument_rate']:.1f}%, "
                f"final answers {100 * r['accuracy']:.1f}% with tools")
        if "accuracy_without_tools" in r:
            line += f", {100 * r['accuracy_without_tools']:.1f}% without"
        print(line, file=sys.stdout)
    if r.get("glaive_conversations"):
        print(f"{r['glaive_conversations']} glaive conversations: function name "
              f"{100 * r['function_name_accuracy']:.1f}%, argument keys {100 * r['argument_key_accuracy']:.1f}%",
              file=sys.stdout)
    return 0
