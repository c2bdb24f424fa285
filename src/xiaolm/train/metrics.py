"""What a run reports: metrics.jsonl, TensorBoard, the loss-curve PNG and the console progress."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from xiaolm.utils import human, log, read_log_lines, write_jsonl


def resolve_tensorboard(cfg) -> None:
    """``--tensorboard`` (on by default) without TensorBoard installed: one warning, and the option is turned off
    so that config.yaml records what really happens."""
    if not cfg.tensorboard:
        return
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except Exception:
        log("warning: TensorBoard is not installed (pip install tensorboard): writing metrics.jsonl only; "
            "config.yaml records tensorboard: false")
        cfg.tensorboard = False


class MetricsLog:
    """metrics.jsonl (and TensorBoard when installed), written by rank 0."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: Optional[int]):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # Drop records logged after the checkpoint we resume from: they are about to be redone.
            kept = [r for r in _read_metrics(self.path) if r.get("step", 0) <= resume_step]
            write_jsonl(self.path, kept)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except Exception:  # tensorboard not installed: metrics.jsonl is enough
                self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record.get("step", 0))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _read_metrics(path: Path, quiet: bool = False) -> list[dict]:
    """metrics.jsonl's records; a last line cut by a crash is dropped (and said, unless ``quiet``)."""
    out = []
    if path.exists():
        if quiet:
            data = path.read_bytes()
            lines = data[:data.rfind(b"\n") + 1].decode("utf-8", errors="replace").splitlines()
        else:
            lines = read_log_lines(path, strict=False)
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def plot_loss_curve(run_dir: Path, title: str = "") -> Optional[Path]:
    """loss_curve.png: training loss and validation loss against tokens seen."""
    records = _read_metrics(run_dir / "metrics.jsonl", quiet=True)
    train = [r for r in records if r.get("kind") == "train" and "loss" in r]
    val = [r for r in records if r.get("kind") == "eval" and "val_loss" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train", lw=1, alpha=0.8)
    if val:
        ax.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", label="validation", lw=1.5)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = run_dir / "loss_curve.png"
    fig.savefig(out)
    plt.close(fig)
    return out


class _Progress:
    """A tqdm bar on a terminal; plain log lines otherwise (CI logs, files)."""

    def __init__(self, total: int, start: int, enabled: bool, bar: bool = True):
        self.enabled = enabled  # rank 0 prints; ``bar`` False gives plain lines even on a terminal
        self.bar = None
        if enabled and bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def show(self, rec: dict, total: int, elapsed: float, steps_done: int) -> None:
        if not self.enabled:
            return
        eta = elapsed / max(1, steps_done) * (total - rec["step"]) if steps_done else 0
        parts = {
            "loss": f"{rec['loss']:.4f}", "lr": f"{rec['lr']:.2e}", "tok/s": human(rec["tokens_per_s"]),
        }
        if "mfu" in rec:
            parts["mfu"] = f"{100 * rec['mfu']:.1f}%"
        if self.bar is not None:
            self.bar.set_postfix(parts, refresh=True)
        else:
            text = " ".join(f"{k} {v}" for k, v in parts.items())
            log(f"step {rec['step']:>6}/{total} {text} eta {_fmt_time(eta)}")

    def show_eval(self, step: int, ev: dict) -> None:
        if not self.enabled:
            return
        scalars = " ".join(f"{k} {v:.4f}" for k, v in ev.items() if isinstance(v, float))
        self.note(f"eval @ {step}: {scalars}")
        for sample in ev.get("samples", []) if isinstance(ev.get("samples"), list) else []:
            self.note(f"  > {sample}")

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            log(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
