"""One honest report card per run: what was trained, on what, for how long, and how well (report.md)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from xiaolm.utils import atomic_write_text, human

_ROWS = [
    ("preset", "model preset", "{}"),
    ("params", "parameters", "{:,}"),
    ("params_body", "parameters without embeddings", "{:,}"),
    ("steps", "optimizer steps", "{:,}"),
    ("tokens", "tokens seen", "{:,}"),
    ("epochs", "epochs over the training data", "{:.2f}"),
    ("wall_s", "wall time (s)", "{:.1f}"),
    ("tokens_per_s", "throughput (tokens/s)", "{:,.0f}"),
    ("device", "device", "{}"),
    ("world_size", "processes", "{}"),
    ("final_train_loss", "final training loss (nats/token)", "{:.4f}"),
    ("val_loss", "validation loss (nats/token)", "{:.4f}"),
    ("best_val_loss", "best validation loss", "{:.4f}"),
    ("val_ppl", "validation perplexity", "{:.2f}"),
    ("val_bpc", "validation bits per character", "{:.4f}"),
    ("val_bpb", "validation bits per byte", "{:.4f}"),
    ("chars_per_token", "characters per token (validation)", "{:.3f}"),
    ("unigram_entropy", "unigram entropy of the data (nats/token; a context-free model's loss)", "{:.4f}"),
]


def _table(summary: dict) -> list[str]:
    lines = ["| measure | value |", "|---|---|"]
    for key, label, fmt in _ROWS:
        value = summary.get(key)
        if value is None:
            continue
        try:
            text = fmt.format(value)
        except (ValueError, TypeError):
            text = str(value)
        lines.append(f"| {label} | {text} |")
    return lines


def write_report(run_dir: str | Path, summary: dict, cfg: Any = None, title: str = "xiaolm run report") -> Path:
    run_dir = Path(run_dir)
    lines = [f"# {title}: `{run_dir.name}`", ""]
    if summary.get("interrupted"):
        lines += [f"**Interrupted at step {summary.get('steps')} of {summary.get('total_steps')}**; "
                  "continue with `--resume`.", ""]
    lines += _table(summary)
    samples = summary.get("samples") or []
    if samples:
        lines += ["", "## Samples at the last evaluation", ""]
        lines += [f"- {s}" for s in samples]
    if (run_dir / "loss_curve.png").exists():
        lines += ["", "## Loss curve", "", "![loss curve](loss_curve.png)"]
    lines += ["", "The full configuration is in `config.yaml` (replay it with `--config config.yaml`); "
              "every logged step is in `metrics.jsonl`."]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def print_summary(summary: dict, file=None) -> None:
    file = file or sys.stdout
    fmt = {"steps": "{} steps", "tokens": None, "wall_s": "{:.1f} s", "val_loss": "val loss {:.4f}",
           "val_bpc": "{:.4f} bits/char", "val_ppl": "perplexity {:.2f}"}
    parts = []
    for key, pattern in fmt.items():
        v = summary.get(key)
        if v is not None:
            parts.append(f"{human(v)} tokens" if pattern is None else pattern.format(v))
    print(f"done: {summary.get('run')}: " + ", ".join(parts), file=file)
    d = summary.get("distill")
    if d and d.get("mode") == "online":
        print(f"  teacher {d['teacher']}: {human(d['teacher_weight_bytes'])}B of weights, {d['teacher_forward_s']} s "
              f"of forward passes ({100 * d['teacher_share_of_wall']:.0f}% of the run)", file=file)
    elif d:
        print(f"  teacher logits {d['teacher_logits']}: top-{d['top_k']}, {d['bytes_per_token']} bytes/token, "
              f"written in {d['logits_write_s']} s once ({d['s_per_million_tokens']} s per million tokens)", file=file)
    for s in summary.get("samples") or []:
        print(f"  > {s}", file=file)
