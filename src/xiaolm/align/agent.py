"""GRPO with tools in the loop (``xiaolm grpo --task tools``): each rollout is a multi-turn episode
(``xiaolm.infer.agent.run_episodes``) whose calls are run by the task's own tools in the sandbox, their results
appended as a ``tool`` turn and generation continued until a final answer or the turn limit. The reward is the tool
task's (``xiaolm.tasks.agent.reward``: the checker's verdict plus a small format term). The policy loss sees only the
tokens the model produced: prompts, tool responses and the generation prompts between turns have no label.

Prompts are the records of ``xiaolm data tools`` (its ``train.jsonl``; a record whose question is in the
``heldout.jsonl`` beside it is refused), rendered with their tool schemas up to the generation prompt. Batches are
sampled, saved and resumed exactly as plain GRPO's: ``xiaolm.align.grpo.ToolRollouts`` is ``Rollouts`` with this
module's ``ToolSampling`` (a mixin here, so that this module does not import ``grpo``, which imports it).
"""
from __future__ import annotations

import statistics

import numpy as np
import torch

from xiaolm.align.common import Sequence
from xiaolm.tokenizer.chat import prompt_ids
from xiaolm.utils import log


class ToolSampling:
    """What makes GRPO's ``Rollouts`` sample tool episodes: the prompts with their tools, and ``sample``."""

    def use_tool_prompts(self, prompts: list[dict]) -> None:
        self.prompts = prompts
        self.prompt_ids = [prompt_ids(self.tokenizer, p["prompt"], p["tools"], self.cfg.enable_thinking)
                           for p in prompts]

    @torch.no_grad()
    def sample(self, g: int) -> dict:
        from xiaolm.infer.agent import EpisodeStats, run_episodes
        from xiaolm.tasks.agent import check_answer, reward
        from xiaolm.tasks.toolbox import call_tool

        cfg, tok, model = self.cfg, self.tokenizer, self.model
        G = cfg.group_size
        chosen, seed = self._chosen(g)
        s = cfg.sampling
        stats = EpisodeStats()
        episodes = run_episodes(model, tok, [self.prompt_ids[i] for i in chosen for _ in range(G)], call_tool,
                                enable_thinking=cfg.enable_thinking, max_turns=cfg.max_turns,
                                max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                                top_p=s.top_p, seed=seed, batch_size=cfg.gen_batch_size, stats=stats)
        self.batches_sampled += 1
        self.gen_stats.samples += stats.episodes
        self.gen_stats.tokens += stats.tokens
        self.gen_stats.seconds += stats.seconds
        self.gen_stats.finished += sum(e.ended == "answered" for e in episodes)
        rewards, correct, seqs = [], [], []
        for k, e in enumerate(episodes):
            task = self.prompts[chosen[k // G]]["task"]
            rewards.append(reward(task, e.final, e.calls, len(e.errors)))
            correct.append(float(e.final is not None and check_answer(task, e.final)))
            arr = np.asarray(e.ids, dtype=np.int64)
            lab = np.asarray(e.labels, dtype=bool)
            seqs.append(Sequence(arr[:-1].copy(), np.where(lab[1:], arr[1:], -100)))
        return self._precomputed(g, seqs, rewards, {
            "accuracy": statistics.fmean(correct),
            "calls_per_episode": stats.tool_calls / max(1, len(episodes)),
            "malformed": statistics.fmean(float(bool(e.errors)) for e in episodes),
            "response_tokens": statistics.fmean(sum(e.labels) for e in episodes),
            # the plain-GRPO report's columns
            "all_met": statistics.fmean(correct), "rep4": 0.0,
        })


def tool_eval_fn(cfg, tokenizer, heldout_prompts: list[dict]):
    """The evaluation GRPO runs at each eval step: held-out accuracy with tools, greedy."""
    from xiaolm.eval.tools import tool_metrics

    def eval_fn(model, step):
        m = tool_metrics(model, tokenizer, heldout_prompts, max_new_tokens=cfg.sampling.max_new_tokens,
                         max_turns=cfg.max_turns, enable_thinking=cfg.enable_thinking, contrast=False)
        log(f"step {step}: held-out tool accuracy {100 * m['accuracy']:.1f}% (valid calls "
            f"{100 * m['valid_call_rate']:.1f}%)")
        return {f"val_{k}": v for k, v in m.items() if isinstance(v, (int, float))}

    return eval_fn
