"""Speedrun: tokens and time until validation bits per character first reaches a target, recipe against recipe.

In the spirit of modded-nanogpt / nanochat, for Chinese. Every variant trains the same model shape on the same
built-in stories, the same batches and the same number of steps (equal tokens); each evaluates the same held-out
stories every ``--eval-every`` steps. Printed side by side in one run:

- ``adamw-cosine``: xiaolm's defaults before the measured recipe (AdamW, cosine, random windows);
- ``hf-llama2c``: a plain transformers ``LlamaForCausalLM`` + AdamW loop with llama2.c's recipe (lr 5e-4, betas
  0.9/0.95, weight decay 0.1, clip 1, cosine to 0, Hugging Face's initialisation);
- one variant per recipe option on top of it; ``recipe-1201``: the first measured recipe (Muon 0.02, zero-initialised
  residual projections, WSD over 20%, tied); ``recipe-v2`` (Muon 0.01, AdamW 1.2e-2 on the untied
  embedding/head/norms, zero-initialised residual projections, WSD over 45%); and ``recipe``: today's pretraining
  defaults, recipe v2 with document masking (each variant is evaluated as ``xiaolm pretrain`` evaluates it: masked
  when it trains masked), see docs/RECIPE.md.

Variants run interleaved, ``--eval-every`` steps at a time, so machine load hits them alike. Tokens to target do
not depend on the load and are the primary figure; the seconds (training only, evaluations excluded) are
indicative on a shared machine. Results (resolved recipes, commit, device, final samples) go to bench/results/.

    python bench/speedrun.py                               # CPU track, all variants
    python bench/speedrun.py --variants adamw-cosine,recipe --steps 300 --target 2.6
    python bench/speedrun.py --track gpu                   # GPU track (24m preset, 512 context, 200k stories)
    python bench/speedrun.py --variants adamw-cosine,hf-llama2c,recipe --short-runs recipe:0.6 --steps 1200

Two tables. "Tokens to target": the first evaluation at or below the target, mid-run (a schedule that decays late,
such as WSD, is handicapped there: its mid-run checkpoints are not annealed). "Complete runs": each run's final
figure, with ``--short-runs`` adding runs of fewer steps whose whole schedule fits their length, as modded-nanogpt's
speedrun counts: does the shorter run end at or below the reference's final bits/char, and in what share of its time?
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
from cli_runs import commit_id  # noqa: E402 (bench/ is on sys.path when run as a script)

# name -> overrides of xiaolm's train/model options (None: the transformers + llama2.c loop). Every variant pins
# what it compares, so the table keeps its meaning when the defaults change: "adamw-cosine" is the recipe that
# was xiaolm's default before docs/RECIPE.md's measurements, "recipe" the measured default since.
OLD = {"train.optimizer": "adamw", "train.schedule": "cosine", "model.zero_init_residual": False,
       "train.windows": "random", "model.tie_word_embeddings": True, "model.doc_mask": False}
# Recipe v2 (docs/RECIPE.md, 2026-12-05): Muon at 0.01 on the hidden matrices, AdamW at 1.2e-2 (4x the old lr) on the
# untied embedding, head and norms, WSD decaying over the last 45%, zero-initialised residual projections. The
# measured defaults ("recipe") add document masking: attention and positions restart at every story.
RECIPE_V2 = {**OLD, "train.optimizer": "muon", "train.muon_lr": 0.01, "train.adam_lr": 1.2e-2,
             "model.zero_init_residual": True, "train.schedule": "wsd", "train.decay_fraction": 0.45,
             "model.tie_word_embeddings": False}
RECIPE = {**RECIPE_V2, "model.doc_mask": True}
VARIANTS = {
    "adamw-cosine": OLD,
    "hf-llama2c": None,
    "muon": {**OLD, "train.optimizer": "muon"},
    "zero-init": {**OLD, "model.zero_init_residual": True},
    "wsd": {**OLD, "train.schedule": "wsd"},
    "aligned": {**OLD, "train.windows": "aligned"},
    "recipe-1201": {**OLD, "train.optimizer": "muon", "model.zero_init_residual": True, "train.schedule": "wsd",
                    "train.muon_lr": 0.02, "train.decay_fraction": 0.2},  # the first measured recipe (2026-12-01)
    "recipe-v2": RECIPE_V2,
    "recipe": RECIPE,
}
REFERENCE = "adamw-cosine"
TRACKS = {  # stories, vocab, preset, seq_len, micro batch, steps, eval every, eval tokens
    "cpu": dict(stories=12_000, vocab=4096, preset="quickstart", seq_len=128, batch=16, steps=240, eval_every=40,
                eval_tokens=16_384),
    "gpu": dict(stories=200_000, vocab=8192, preset="24m", seq_len=512, batch=64, steps=2000, eval_every=100,
                eval_tokens=262_144),
}


def build_data(cache: Path, stories: int, vocab: int, seed: int = 0) -> Path:
    """Built-in stories -> prepared corpus -> tokenizer -> shards, cached in ``cache``."""
    from xiaolm.data.prepare import prepare
    from xiaolm.data.shards import tokenize_to_shards
    from xiaolm.data.synth import write_stories
    from xiaolm.data.vocab import train_tokenizer

    shards = cache / "shards"
    if (shards / "meta.json").is_file():
        return shards
    cache.mkdir(parents=True, exist_ok=True)
    write_stories(cache / "stories.jsonl", num=stories, seed=seed)
    prepare([str(cache / "stories.jsonl")], cache / "data", field="story_zh", quiet=True)
    tok = train_tokenizer([str(cache / "data")], cache / "tokenizer", vocab_size=vocab)
    tokenize_to_shards([str(cache / "data")], tok.path, shards, workers=1)
    return shards


def _set(cfg, dotted: str, value) -> None:
    section, name = dotted.split(".")
    setattr(getattr(cfg, section), name, value)


class _HFAdapter(torch.nn.Module):
    """transformers' model behind the calls StreamEvaluator makes (``.device``, ``model(x).logits``)."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    @property
    def device(self):
        return next(self.hf.parameters()).device

    def forward(self, input_ids, doc_ids=None):
        return self.hf(input_ids=input_ids)


class Run:
    """One variant: its model, optimiser, schedule and sampler, stepped a chunk at a time."""

    def __init__(self, name, overrides, base_cfg, tokenizer, shards, total_steps, device):
        from xiaolm.train.dist import DistEnv
        from xiaolm.train.optim import build_optimizer
        from xiaolm.train.pretrain import AlignedWindowSampler, WindowSampler, build_model
        from xiaolm.utils import seed_everything

        self.name, self.total, self.device = name, total_steps, device
        cfg = copy.deepcopy(base_cfg)
        self.hf = overrides is None
        if self.hf:  # llama2.c's train.py recipe
            cfg.train.lr, cfg.train.min_lr_ratio, cfg.train.weight_decay = 5e-4, 0.0, 0.1
            cfg.train.warmup_steps, cfg.train.schedule = 1000, "cosine"
        for k, v in (overrides or {}).items():
            _set(cfg, k, v)
        self.cfg = cfg
        seed_everything(cfg.train.seed)
        model = build_model(cfg, tokenizer.vocab_size, tokenizer)
        if self.hf:
            import transformers

            m = model.config
            hf_cfg = transformers.LlamaConfig(
                vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
                num_key_value_heads=m.num_key_value_heads, max_position_embeddings=m.max_position_embeddings,
                tie_word_embeddings=True, rms_norm_eps=m.rms_norm_eps, rope_theta=m.rope_theta,
                attn_implementation="sdpa")
            self.model = _HFAdapter(transformers.LlamaForCausalLM(hf_cfg)).to(device)
            decay = [p for p in self.model.parameters() if p.dim() >= 2]
            rest = [p for p in self.model.parameters() if p.dim() < 2]
            self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0}],
                                         lr=cfg.train.lr, betas=(0.9, 0.95), fused=True)
        else:
            self.model = model.to(device)
            self.opt, _ = build_optimizer(cfg.train, self.model, self.model.param_groups(cfg.train.weight_decay),
                                          device, sharded=False)
        env = DistEnv(device=device)
        kind = AlignedWindowSampler if getattr(cfg.train, "windows", "random") == "aligned" else WindowSampler
        self.doc_mask = cfg.model.doc_mask and not self.hf
        self.sampler = kind(shards, cfg.model.seq_len, cfg.train.seed, cfg.train.micro_batch_size, 1, env,
                            doc_mask=self.doc_mask, eot_id=tokenizer.eot_id)
        self.step, self.tokens, self.train_s = 0, 0, 0.0
        self.evals: list[dict] = []
        self.hit = None

    def loss(self, x, y, doc_ids=None):
        if self.hf:
            logits = self.model(x).logits
            return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        return self.model(x, targets=y, doc_ids=doc_ids).loss

    def advance(self, n: int) -> None:
        from xiaolm.train.schedule import lr_at

        self.model.train()
        t0 = time.perf_counter()
        for _ in range(min(n, self.total - self.step)):
            lr = lr_at(self.step, self.cfg.train, self.total)
            for g in self.opt.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            batch = self.sampler(self.step, 0)
            x, y = batch["input_ids"].to(self.device), batch["targets"].to(self.device)
            doc_ids = batch["doc_ids"].to(self.device) if "doc_ids" in batch else None
            loss = self.loss(x, y, doc_ids)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(self.model.parameters()), self.cfg.train.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            self.tokens += x.numel()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.train_s += time.perf_counter() - t0

    def evaluate(self, evaluators, target: float) -> dict:
        """``evaluators[doc_mask]``: each variant is evaluated as ``xiaolm pretrain`` evaluates it (with document
        masking when it trains with it; the unmasked models score better unmasked than masked)."""
        self.model.eval()
        with torch.no_grad():
            ev = evaluators[self.doc_mask](self.model)
        rec = {"step": self.step, "tokens": self.tokens, "train_s": round(self.train_s, 2),
               "val_bpc": round(ev["val_bpc"], 4), "val_loss": round(ev["val_loss"], 4)}
        self.evals.append(rec)
        if self.hit is None and ev["val_bpc"] <= target:
            self.hit = rec
        return rec

    def samples(self, tokenizer, prompts, n_tokens) -> list[str]:
        if self.hf:
            out = []
            for p in prompts:
                ids = torch.tensor([tokenizer.encode(p)], device=self.device)
                gen = self.model.hf.generate(ids, max_new_tokens=n_tokens, do_sample=False,
                                             pad_token_id=tokenizer.pad_id)
                out.append(p + tokenizer.decode(gen[0, ids.shape[1]:].tolist(), skip_special_tokens=True))
            return out
        from xiaolm.train.pretrain import sample_openings

        return sample_openings(self.model, tokenizer, prompts, n_tokens, 0.0)


def _parse_override(text: str) -> dict:
    """``train.lr=3e-3,model.preset=tiny`` -> dict with values parsed as JSON where they parse."""
    out = {}
    for item in filter(None, text.split(",")):
        k, _, v = item.partition("=")
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v.strip()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--track", choices=sorted(TRACKS), default=None, help="default: gpu with CUDA, else cpu")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from: " + ", ".join(VARIANTS))
    ap.add_argument("--extra", action="append", default=[],
                    help="another variant NAME:key=value,key=value (e.g. muon-lr05:train.optimizer=muon,"
                         "train.muon_lr=0.05)")
    ap.add_argument("--base", default="", help="overrides for every xiaolm variant, key=value,... ")
    ap.add_argument("--target", type=float, default=None, help="validation bits/char to reach (default: "
                                                                "adamw-cosine's bpc at 75%% of the run, this run)")
    ap.add_argument("--short-runs", default="",
                    help="complete runs of fewer steps, NAME:FRACTION,... (e.g. recipe:0.6): the variant trained "
                         "with its whole schedule fitted to FRACTION x --steps; the complete-runs table asks "
                         "whether its final bits/char reaches the reference's final figure")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--eval-every", type=int)
    ap.add_argument("--stories", type=int)
    ap.add_argument("--preset")
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--lr", type=float, default=3e-3, help="xiaolm variants' --lr (the quickstart's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=None, help="data cache directory (default: /tmp/xiaolm-speedrun-TRACK)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--tag", default="", help="added to the result file's name")
    ap.add_argument("--sample-tokens", type=int, default=48)
    args = ap.parse_args(argv)

    from xiaolm.eval.loss import StreamEvaluator
    from xiaolm.train.pretrain import PretrainConfig, _open_data
    from xiaolm.utils import pick_device

    device = pick_device("auto")
    track = args.track or ("gpu" if device.startswith("cuda") else "cpu")
    spec = dict(TRACKS[track])
    for k in ("steps", "eval_every", "stories", "preset", "seq_len", "batch"):
        if getattr(args, k) is not None:
            spec[k] = getattr(args, k)
    cache = Path(args.cache or f"/tmp/xiaolm-speedrun-{track}-{spec['stories']}-{spec['vocab']}")
    shards = build_data(cache, spec["stories"], spec["vocab"], args.seed)

    base = PretrainConfig(data=str(shards))
    base.model.preset, base.model.seq_len = spec["preset"], spec["seq_len"]
    base.train.micro_batch_size, base.train.lr, base.train.seed = spec["batch"], args.lr, args.seed
    base.train.warmup_steps, base.train.device = 50, device  # the quickstart's warmup
    for k, v in _parse_override(args.base).items():
        _set(base, k, v)
    tokenizer, train, val = _open_data(base)
    src = val if val is not None else train
    val_tokens = src.read(0, min(spec["eval_tokens"] + 1, src.num_tokens))
    evaluator = {m: StreamEvaluator(val_tokens, tokenizer, spec["seq_len"], 32, doc_mask=m) for m in (False, True)}

    variants = {n: VARIANTS[n] for n in args.variants.split(",") if n}
    for extra in args.extra:
        name, _, text = extra.partition(":")
        variants[name] = _parse_override(text)
    runs = [Run(n, o, base, tokenizer, train, spec["steps"], device) for n, o in variants.items()]
    for item in filter(None, args.short_runs.split(",")):
        name, _, frac = item.partition(":")
        if name not in variants:
            raise SystemExit(f"--short-runs {item}: {name!r} is not among --variants / --extra")
        short = f"{name}@{float(frac):g}"
        variants[short] = variants[name]
        runs.append(Run(short, variants[name], base, tokenizer, train, max(1, round(float(frac) * spec["steps"])),
                        device))
    print(f"speedrun {track}: {spec['preset']} preset, vocab {tokenizer.vocab_size}, context {spec['seq_len']}, "
          f"batch {spec['batch']}, {spec['steps']} steps ({spec['steps'] * spec['batch'] * spec['seq_len']:,} tokens) "
          f"per variant, device {device}, {torch.get_num_threads()} threads, commit {commit_id()}", flush=True)
    for r in runs:
        r.evaluate(evaluator, -1.0)
    while any(r.step < r.total for r in runs):
        for r in runs:  # interleaved: a busy machine slows every variant alike
            if r.step < r.total:
                r.advance(spec["eval_every"])
                rec = r.evaluate(evaluator, -1.0)
                print(f"  {r.name:<14} step {rec['step']:>5}  val bpc {rec['val_bpc']:.4f}  "
                      f"{1000 * r.train_s / max(1, r.step):.0f} ms/step", flush=True)
    target = args.target
    if target is None:  # the reference's figure at 75% of the run: a target it reaches, late
        ref = next((r for r in runs if r.name == REFERENCE), runs[0])
        at = [e for e in ref.evals if e["step"] >= 0.75 * ref.total]
        target = at[0]["val_bpc"] if at else ref.evals[-1]["val_bpc"]
    for r in runs:
        r.hit = next((e for e in r.evals if e["val_bpc"] <= target), None)
    ref = next((r for r in runs if r.name == REFERENCE), None)

    print(f"\ntarget: validation bits/char <= {target:.4f} (evaluated every {spec['eval_every']} steps)")
    head = (f"| {'variant':<16} | tokens to target | vs {REFERENCE:<8} | s to target | time vs {REFERENCE} | ms/step "
            f"| final val bpc |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    rows = []
    for r in runs:
        ms = 1000 * r.train_s / max(1, r.step)
        if r.hit:
            reached = ref is not None and ref.hit
            ratio = f"{r.hit['tokens'] / ref.hit['tokens']:.2f}x" if reached else "-"
            t_ratio = f"{r.hit['train_s'] / max(ref.hit['train_s'], 1e-9):.2f}x" if reached else "-"
            tok, secs = f"{r.hit['tokens']:,}", f"{r.hit['train_s']:.1f}"
        else:
            tok, secs, ratio, t_ratio = "not reached", "-", "-", "-"
        print(f"| {r.name:<16} | {tok:>16} | {ratio:>15} | {secs:>11} | {t_ratio:>{len(REFERENCE) + 8}} "
              f"| {ms:7.0f} | {r.evals[-1]['val_bpc']:13.4f} |")
        rows.append({"variant": r.name, "overrides": variants[r.name], "hit": r.hit, "ms_per_step": round(ms, 1),
                     "final": r.evals[-1], "evals": r.evals})
    print("tokens to target do not depend on the load; seconds are training time only (evaluations excluded), "
          "comparable within this run (variants interleaved).")

    # Complete runs: every schedule ends annealed, so a run's *final* figure is the fair one (a WSD run mid-way has
    # not decayed yet, a cosine run mid-way partly has). The speedrun question: does a run of fewer steps, its whole
    # schedule fitted to them, end at or below the reference's final bits/char, and in how much training time?
    complete = None
    if ref is not None:
        goal = ref.evals[-1]["val_bpc"]
        head = (f"| {'complete run':<18} | steps | tokens    | train s | time vs {REFERENCE} | final val bpc "
                f"| reaches {REFERENCE}'s final ({goal:.4f}) |")
        print(f"\ncomplete runs (each schedule fitted to its own length; goal: {REFERENCE}'s final "
              f"{goal:.4f} bits/char):")
        print(head)
        print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
        complete = []
        for r in runs:
            final = r.evals[-1]
            ok = final["val_bpc"] <= goal
            t_ratio = r.train_s / max(ref.train_s, 1e-9)
            print(f"| {r.name:<18} | {r.total:5d} | {final['tokens']:>9,} | {r.train_s:7.1f} | "
                  f"{t_ratio:>{len(REFERENCE) + 7}.2f}x | {final['val_bpc']:13.4f} | "
                  f"{'yes' if ok else 'no':<{len(head.split('|')[-2]) - 2}} |")
            complete.append({"variant": r.name, "steps": r.total, "tokens": final["tokens"],
                             "train_s": round(r.train_s, 2), "time_vs_reference": round(t_ratio, 3),
                             "final_bpc": final["val_bpc"], "reaches_reference_final": ok})

    prompts = ["从前，有一个小女孩叫莉莉。", "小明和他的小狗去公园玩。"]
    for r, row in zip(runs, rows):
        row["samples"] = r.samples(tokenizer, prompts, args.sample_tokens)
        row["recipe"] = json.loads(json.dumps({"model": vars(r.cfg.model), "train": vars(r.cfg.train)}, default=str))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = out / f"speedrun-{track}-{stamp}{'-' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps({
        "track": track, "spec": spec, "target_bpc": target, "commit": commit_id(), "device": device,
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "load_avg": os.getloadavg(), "argv": sys.argv[1:], "runs": rows, "complete_runs": complete,
        "note": "variants interleaved; tokens to target is the primary figure, seconds indicative (shared machine)",
    }, ensure_ascii=False, indent=1, default=str), encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
