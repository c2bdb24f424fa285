"""``xiaolm sweep`` (or ``xiaolm pretrain --lr-sweep ...``; both entries are in ``xiaolm.train.pretrain``): short
trials at several learning rates.

Each rate trains the same model from the same initialisation on the same batches for a short budget; the table
and plot show final training and validation loss per rate and name the best. Small models want much higher rates
than large ones, and every from-scratch project learned that the hard way.
"""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path
from typing import Any, Callable

from xiaolm.rundir import lock_run_dir
from xiaolm.utils import atomic_write_json, log


def sweep(cfg, pretrain: Callable[[Any], dict]) -> dict:
    """One short ``pretrain(trial_cfg)`` run per rate in ``cfg.lr_sweep``; ``pretrain`` is passed in by
    ``xiaolm.train.pretrain``, whose ``pretrain()`` dispatches here, so this module imports nothing from it."""
    rates = list(cfg.lr_sweep)
    if not rates:
        raise ValueError("--lr-sweep needs at least one learning rate")
    base = Path(cfg.out)
    lock_run_dir(base, "sweep")  # the trials' own directories are claimed by their runs
    if cfg.train.max_steps is None and cfg.train.max_tokens is None:
        cfg.train.max_steps = 200
        log("sweep: no --max-steps given; 200 steps per trial")
    results = []
    for lr in rates:
        trial = copy.deepcopy(cfg)
        trial.lr_sweep = []
        trial.train.lr = lr
        trial.train.resume = False
        trial.train.resume_from = None
        trial.out = str(base / f"lr-{lr:g}")
        trial.eval.prompts = []
        log(f"\n=== sweep trial lr={lr:g} -> {trial.out}")
        s = pretrain(trial)
        results.append({"lr": lr, "train_loss": s.get("final_train_loss"), "val_loss": s.get("val_loss"),
                        "val_bpc": s.get("val_bpc"), "run": trial.out})
    finite = [r for r in results if r["val_loss"] is not None and math.isfinite(r["val_loss"])]
    best = min(finite, key=lambda r: r["val_loss"]) if finite else None
    summary = {"trials": results, "best_lr": best["lr"] if best else None, "run": str(base), "exit_code": 0}
    atomic_write_json(base / "sweep.json", summary)
    _plot(base, results)
    print(f"\n{'lr':>10} {'train loss':>11} {'val loss':>9} {'val bpc':>8}", file=sys.stdout)
    for r in results:
        mark = "  <- best" if best and r is best else ""
        fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else "  -  "  # noqa: E731
        print(f"{r['lr']:>10.2e} {fmt(r['train_loss']):>11} {fmt(r['val_loss']):>9} {fmt(r['val_bpc']):>8}{mark}",
              file=sys.stdout)
    if best:
        print(f"best learning rate: {best['lr']:g} (plot: {base / 'sweep.png'})", file=sys.stdout)
    return summary


def _plot(base: Path, results: list[dict]) -> None:
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for r in results:
        path = Path(r["run"]) / "metrics.jsonl"
        if not path.exists():
            continue
        recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        tr = [x for x in recs if x.get("kind") == "train"]
        ax1.plot([x["step"] for x in tr], [x["loss"] for x in tr], label=f"lr {r['lr']:g}")
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ok = [r for r in results if r["val_loss"] is not None and math.isfinite(r["val_loss"])]
    ax2.plot([r["lr"] for r in ok], [r["val_loss"] for r in ok], "o-")
    ax2.set_xscale("log")
    ax2.set_xlabel("learning rate")
    ax2.set_ylabel("final validation loss")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(base / "sweep.png")
    plt.close(fig)
