"""``xiaolm quickstart``: the whole route on the built-in corpus, in minutes, on whatever machine you have.

synthesise stories -> prepare (clean, dedup, split) -> train a tokenizer -> tokenise into shards -> pretrain
-> print stories the model writes from fixed openings, and its validation curve.

The training length is set by a time budget: a few calibration steps measure this machine's speed, and the run is
sized so its learning-rate schedule ends exactly when the budget does (stopping a cosine schedule early would leave
the rate high and the model worse). With a GPU it trains a larger model on more stories in the same time.
"""
from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from xiaolm.config import opt, parse_config, save_config
from xiaolm.utils import log, pick_device

OPENINGS = [
    "从前，有一个小女孩叫莉莉。",
    "小明和他的小狗去公园玩。",
    "一只小猫坐在窗户边，",
    "有一天，小兔子在森林里",
    "老奶奶的院子里有一棵大树。",
]


@dataclass
class QuickstartConfig:
    """Synthesise the built-in Chinese story corpus, prepare it, train a tokenizer, tokenise, pretrain a small model \
within a time budget, then print stories it writes and its validation curve. About 3-4 minutes on 2 CPU cores; with \
a GPU, a larger model in the same time."""

    out: str = opt("xiaolm-quickstart", "working directory for every stage's output")
    time_budget: Optional[float] = opt(None, "seconds of training (default: 150 on CPU, 240 on GPU)")
    stories: Optional[int] = opt(None, "stories to synthesise (default: 30,000 on CPU, 200,000 on GPU)")
    vocab_size: Optional[int] = opt(None, "tokenizer vocabulary (default: 4,096 on CPU, 8,192 on GPU)")
    preset: Optional[str] = opt(None, "model preset (default: quickstart on CPU, 24m on GPU)")
    seq_len: Optional[int] = opt(None, "context length (default: 256 on CPU, 512 on GPU)")
    micro_batch_size: Optional[int] = opt(None, "sequences per step (default: 16 on CPU, 64 on GPU)")
    lr: Optional[float] = opt(None, "peak learning rate of the embedding, head and norms (Muon trains the rest; "
                                    "default: 1.2e-2 on CPU, 2e-3 on GPU)")
    max_steps: Optional[int] = opt(None, "train exactly this many steps instead of sizing the run to the time budget")
    seed: int = opt(0, "seed for the corpus, the model and sampling")
    device: str = opt("auto", "auto, cpu, cuda or mps")
    max_new_tokens: int = opt(160, "tokens written per opening")
    temperature: float = opt(0.8, "sampling temperature of the stories shown at the end")
    top_k: int = opt(50, "top-k of the stories shown at the end")
    workers: Optional[int] = opt(None, "processes for tokenisation (default: all cores)")
    judge_endpoint: Optional[str] = opt(None, "OpenAI-compatible endpoint (.../v1) of a judge model that grades "
                                              "the stories (xiaolm eval judge); none: a line says how")
    judge_model: Optional[str] = opt(None, "the judge's model name (key: $XIAOLM_JUDGE_API_KEY or $OPENAI_API_KEY)")


@dataclass
class Defaults:
    time_budget: float
    stories: int
    vocab_size: int
    preset: str
    seq_len: int
    micro_batch_size: int
    lr: float


# CPU lr: measured (docs/RECIPE.md, 2026-12-05); the GPU figure predates that round and is not re-measured yet
CPU = Defaults(150.0, 30_000, 4096, "quickstart", 256, 16, 1.2e-2)
GPU = Defaults(240.0, 200_000, 8192, "24m", 512, 64, 2e-3)


def resolve(cfg: QuickstartConfig, device: str) -> QuickstartConfig:
    base = GPU if device.startswith("cuda") else CPU
    cfg = copy.deepcopy(cfg)
    for name in ("time_budget", "stories", "vocab_size", "preset", "seq_len", "micro_batch_size", "lr"):
        if getattr(cfg, name) is None:
            setattr(cfg, name, getattr(base, name))
    return cfg


def _stage(title: str):
    log(f"\n== {title}")
    return time.perf_counter()


def calibrate_step_time(pcfg, steps: int = 4) -> float:
    """Seconds per optimizer step of this model, batch and device (a few real steps, the first discarded)."""
    import torch

    from xiaolm.train.dist import setup_distributed
    from xiaolm.train.engine import Trainer
    from xiaolm.train.pretrain import WindowSampler, _open_data, build_model, lm_loss

    env = setup_distributed(pcfg.train.device)
    tokenizer, train, _ = _open_data(pcfg)
    model = build_model(pcfg, tokenizer.vocab_size, tokenizer)
    trainer = Trainer(copy.deepcopy(pcfg.train), model, Path(pcfg.out) / "calibration", total_steps=steps,
                      dist_env=env, name="calibration")
    sampler = WindowSampler(train, pcfg.model.seq_len, 0, pcfg.train.micro_batch_size, 1, env,
                            doc_mask=pcfg.model.doc_mask, eot_id=tokenizer.eot_id)
    trainer.model.train()
    times = []
    for s in range(steps):
        t = time.perf_counter()
        # the loss the run will use: the device's chunking, as the Trainer resolved it
        trainer.train_step([sampler(s, 0)], lambda m, b: lm_loss(m, b, trainer.cfg.loss_chunk_size), s)
        if env.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    import shutil

    shutil.rmtree(Path(pcfg.out) / "calibration", ignore_errors=True)
    return sum(times[1:]) / max(1, len(times) - 1)


def ascii_curve(points: list[tuple[int, float]], width: int = 40) -> list[str]:
    if not points:
        return []
    lo, hi = min(v for _, v in points), max(v for _, v in points)
    lines = []
    for step, v in points:
        bar = int(round((v - lo) / (hi - lo) * width)) if hi > lo else 0
        lines.append(f"  step {step:>6}  val loss {v:7.4f}  {'█' * max(1, bar)}")
    return lines


JUDGE_HINT = ("Graded like the TinyStories paper (grammar, creativity, consistency, by a judge model): "
              "xiaolm eval judge {run} --endpoint URL --model NAME")


def show_stories(model, tokenizer, cfg: QuickstartConfig, file) -> list:
    """Write a story from each opening and print them: whole characters only, each ending where the model ended
    it or cut back to its last sentence end and marked as cut."""
    from xiaolm.infer.generate import SamplingConfig
    from xiaolm.infer.stories import story_line, tell_stories

    stories = tell_stories(model, tokenizer, OPENINGS, SamplingConfig(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, seed=cfg.seed))
    print("Stories written by your model (the opening is given, the rest is generated):\n", file=file)
    for story in stories:
        print(f"  {story_line(story, cfg.max_new_tokens)}\n", file=file)
    dropped = sum(s.dropped_bytes for s in stories)
    if dropped:
        print(f"  ({dropped} byte(s) of characters the model left unfinished were left out)\n", file=file)
    return stories


def show_judge_grades(run: Path, cfg: QuickstartConfig, device: str, file, **options) -> Optional[dict]:
    """With ``--judge-endpoint``: grade the model's stories (``xiaolm eval judge``, one completion per opening;
    ``options`` override its other defaults) and print the table; without: one line saying how to get it."""
    if not cfg.judge_endpoint:
        print(JUDGE_HINT.format(run=run), file=file)
        return None
    from xiaolm.eval.judge import JudgeConfig, format_table, judge

    judged = judge(JudgeConfig(run=str(run), endpoint=cfg.judge_endpoint, model=cfg.judge_model or "",
                               samples=1, device=device, seed=cfg.seed, **options))
    print(f"\nStories graded by {cfg.judge_model} (1-10, mean and 95% interval; details in "
          f"{judged['out']}/judge.md):\n{format_table(judged)}", file=file)
    return judged


def run_quickstart(cfg: QuickstartConfig) -> dict:
    from xiaolm.data.prepare import prepare
    from xiaolm.data.shards import tokenize_to_shards
    from xiaolm.data.synth import write_stories
    from xiaolm.data.vocab import train_tokenizer
    from xiaolm.train.pretrain import PretrainConfig, pretrain

    device = pick_device(cfg.device)
    cfg = resolve(cfg, device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "quickstart.yaml")
    t_all = time.perf_counter()
    timings = {}

    t = _stage(f"1/5 synthesising {cfg.stories:,} stories")
    stories = out / "stories.jsonl"
    write_stories(stories, num=cfg.stories, seed=cfg.seed)
    timings["synth_s"] = time.perf_counter() - t

    t = _stage("2/5 preparing: cleaning, filtering, deduplicating, splitting")
    report = prepare([str(stories)], out / "data", field="story_zh", quiet=True)
    log(f"kept {report['documents_kept']:,} of {report['documents_in']:,} documents "
        f"({report.get('duplicates_exact', 0)} exact and {report.get('duplicates_near', 0)} near duplicates removed)")
    timings["prepare_s"] = time.perf_counter() - t

    t = _stage(f"3/5 training a {cfg.vocab_size:,}-token byte-level BPE tokenizer")
    tok = train_tokenizer([str(out / "data")], out / "tokenizer", vocab_size=cfg.vocab_size)
    timings["tokenizer_s"] = time.perf_counter() - t

    t = _stage("4/5 tokenising into memory-mapped shards")
    meta = tokenize_to_shards([str(out / "data")], tok.path, out / "shards", workers=cfg.workers)
    log(f"{meta['tokens']:,} tokens, {meta['chars_per_token']:.2f} characters per token")
    timings["tokenize_s"] = time.perf_counter() - t

    pcfg = PretrainConfig(data=str(out / "shards"), tokenizer=str(tok.path), out=str(out / "run"))
    pcfg.model.preset, pcfg.model.seq_len = cfg.preset, cfg.seq_len
    t_cfg = pcfg.train
    t_cfg.device, t_cfg.seed, t_cfg.lr = device, cfg.seed, cfg.lr
    t_cfg.micro_batch_size, t_cfg.warmup_steps, t_cfg.min_lr_ratio = cfg.micro_batch_size, 50, 0.1
    t_cfg.log_every, t_cfg.keep_last, t_cfg.tensorboard = 25, 1, False
    pcfg.eval.eval_tokens, pcfg.eval.sample_tokens = 16_384, 48
    if cfg.max_steps:
        t_cfg.max_steps, plan = cfg.max_steps, f"{cfg.max_steps} steps"
    else:
        step_s = calibrate_step_time(pcfg)
        # Evaluations, samples and checkpoints take ~15% of the budget; leave that out of the step count.
        t_cfg.max_steps = max(20, int(cfg.time_budget * 0.85 / step_s))
        plan = f"{t_cfg.max_steps} steps (~{step_s * 1000:.0f} ms each, budget {cfg.time_budget:.0f} s)"
    t_cfg.eval_every = max(10, t_cfg.max_steps // 4)
    t = _stage(f"5/5 pretraining the {cfg.preset} preset on {device}: {plan}")
    summary = pretrain(pcfg)
    timings["pretrain_s"] = time.perf_counter() - t

    from xiaolm.model.io import load_model

    model, tokenizer, _ = load_model(out / "run", device=device)
    total = time.perf_counter() - t_all
    import json

    evals = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["val_loss"]) for r in evals if r.get("kind") == "eval"]
    p = sys.stdout
    print("\n" + "=" * 72, file=p)
    stories = show_stories(model, tokenizer, cfg, p)
    texts = [s.text for s in stories]
    print("Validation curve:", file=p)
    for line in ascii_curve(curve):
        print(line, file=p)
    from xiaolm.tasks.constraints import aggregate_repetition, repetition_metrics

    repetition = aggregate_repetition([repetition_metrics(t) for t in texts])
    print(f"\n  the {len(texts)} stories: rep-4 {repetition['rep4'] or 0:.3f} (share of repeated 4-grams; a looping "
          f"text nears 1), distinct-2 {repetition['distinct2'] or 0:.3f} (unique 2-grams; higher is more varied)",
          file=p)
    print(f"  unigram entropy of the data {summary['unigram_entropy']:.3f} nats/token (a model ignoring context);"
          f"\n  final validation loss {summary.get('val_loss', float('nan')):.3f} nats/token, "
          f"{summary.get('val_bpc', float('nan')):.3f} bits per character", file=p)
    print(f"\nDone in {total:.0f} s ({', '.join(f'{k[:-2]} {v:.0f} s' for k, v in timings.items())}).", file=p)
    print(f"Run directory: {out / 'run'} (report.md, loss_curve.png, metrics.jsonl, config.yaml)", file=p)
    print(f"Next: xiaolm generate {out / 'run'} --prompt 从前  |  xiaolm eval ppl {out / 'run'} --data {out / 'shards'}",
          file=p)
    judged = show_judge_grades(out / "run", cfg, device, p)
    result = dict(summary, total_s=round(total, 1), timings={k: round(v, 1) for k, v in timings.items()},
                  stories=texts, openings=OPENINGS, stories_cut=[s.cut for s in stories],
                  dropped_bytes=sum(s.dropped_bytes for s in stories),
                  judge=(judged or {}).get("rows"),
                  repetition={k: repetition[k] for k in ("rep4", "distinct2", "mean_chars")})
    from xiaolm.utils import atomic_write_json

    atomic_write_json(out / "quickstart.json", result)
    return result


def main(argv: list[str]) -> int:
    cfg, _ = parse_config(
        QuickstartConfig, argv, "xiaolm quickstart"
    )
    run_quickstart(cfg)
    return 0
