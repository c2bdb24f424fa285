"""The GPU proof's driver (run it through bench/gpu_proof.sh, which installs the carried wheels first).

Runs every step as a subprocess under its own time box (a step that fails or hangs is killed at its box and the
next one starts), within a global budget, in the order of what each figure is worth: the environment -> the one
headline training shape (ours compiled vs transformers compiled) -> the quickstart at GPU size -> ``pytest -m gpu``
-> decode throughput -> the rest (SFT and eval instruct on the quickstart's model, the GPU speedrun track, the
profile). Every step appends its section to OUT/gpu_report.md the moment it finishes, and the benchmarks append each
table row the moment it is measured, so a kill at any moment leaves every finished figure on disk;
OUT/gpu_report.json is rewritten after each step and OUT/gpu_proof.log holds every step's full output. The corpus
(synth -> prepare -> tokenizer -> tokenize -> instructions) is built by a background chain on the CPU cores while
the GPU runs the headline. The inductor and Triton caches live in the work folder, so a rerun on the same machine
skips the compiles.

    python bench/gpu_proof.py [--quick] [--dry-run] [--profile] [--out DIR] [--work DIR]

``--dry-run`` runs the same steps on the CPU with tiny shapes and budgets (CI runs it through
tests/test_gpu_proof.py, so the script cannot rot between GPU runs).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The serial steps, in the order they run (worth first). "data" runs in the background from the start and must end
# before "quickstart"; "profile" runs only with --profile.
STEPS = ("env", "train_headline", "quickstart", "pytest_gpu", "decode", "sft", "eval_instruct", "speedrun",
         "profile")


@dataclass
class Plan:
    """Sizes of one mode. Boxes are seconds (a step whose box is 0 is not part of the mode); the serial boxes sum
    to at most ``budget`` (tests/test_gpu_proof.py checks it), so no step is starved by an earlier one."""

    budget: float
    device: str
    stories: int
    vocab: int
    preset: str
    seq_len: int
    micro_batch: int
    pretrain_s: float
    compile_reserve_s: float
    instructions: int
    eval_new_tokens: int
    train_args: list
    generate_args: list
    speedrun_args: list
    boxes: dict

    def serial_boxes(self, profile: bool = True) -> float:
        return sum(v for k, v in self.boxes.items() if k != "data" and (profile or k != "profile"))


# Full: one device call of about 8 minutes (the device tool: 15 minutes per session including a 1-2 minute machine
# start, at most 10 minutes per command): 480 s of steps, run with timeout_s 540 to leave room for the wheels and
# the start of Python. Measured on the CPU only so far; the boxes are estimates from H100 costs (a cold
# torch.compile of one of these models takes tens of seconds, forward and backward).
FULL = Plan(
    budget=480, device="cuda", stories=100_000, vocab=8192, preset="24m", seq_len=512, micro_batch=64,
    pretrain_s=100, compile_reserve_s=40, instructions=100, eval_new_tokens=128,
    train_args=["--shapes", "58m-v64k", "--headline", "--steps", "8", "--warmup", "3", "--rounds", "1"],
    generate_args=["--batches", "1", "64", "--new-tokens", "128", "--reps", "2"],
    speedrun_args=["--track", "gpu", "--variants", "adamw-cosine,recipe", "--steps", "150", "--eval-every", "50"],
    boxes={"env": 15, "data": 150, "train_headline": 115, "quickstart": 110, "pytest_gpu": 75, "decode": 45,
           "sft": 40, "eval_instruct": 25, "speedrun": 40, "profile": 15},
)
QUICK = Plan(
    budget=240, device="cuda", stories=50_000, vocab=8192, preset="24m", seq_len=512, micro_batch=64,
    pretrain_s=70, compile_reserve_s=40, instructions=50, eval_new_tokens=128,
    train_args=["--shapes", "58m-v64k", "--headline", "--steps", "8", "--warmup", "3", "--rounds", "1"],
    generate_args=["--batches", "1", "64", "--new-tokens", "128", "--reps", "1"],
    speedrun_args=[],
    boxes={"env": 15, "data": 100, "train_headline": 100, "quickstart": 85, "pytest_gpu": 0, "decode": 40,
           "sft": 0, "eval_instruct": 0, "speedrun": 0, "profile": 0},
)
# The dry run's boxes are wide: on a loaded 2-core machine importing torch and transformers alone takes 10-20 s.
DRY = Plan(
    budget=420, device="cpu", stories=1500, vocab=1024, preset="tiny", seq_len=128, micro_batch=8,
    pretrain_s=8, compile_reserve_s=0, instructions=6, eval_new_tokens=16,
    train_args=["--device", "cpu", "--shapes", "quickstart-v4k", "--batch", "2", "--seq", "64", "--steps", "2",
                "--warmup", "1", "--rounds", "1", "--headline", "--no-compile"],
    generate_args=["--device", "cpu", "--shape", "quickstart-v4k", "--batches", "1", "4", "--new-tokens", "8",
                   "--reps", "1", "--no-compile"],
    speedrun_args=["--track", "cpu", "--variants", "adamw-cosine,recipe", "--preset", "tiny", "--seq-len", "64",
                   "--batch", "4", "--steps", "6", "--eval-every", "3", "--sample-tokens", "4"],
    boxes={"env": 20, "data": 90, "train_headline": 60, "quickstart": 60, "pytest_gpu": 45, "decode": 45,
           "sft": 45, "eval_instruct": 40, "speedrun": 60, "profile": 30},
)


class Runner:
    def __init__(self, plan: Plan, out: Path, work: Path, mode: str = ""):
        self.plan, self.out, self.work, self.mode = plan, out, work, mode
        self.t0 = time.monotonic()
        self.steps: list[dict] = []
        self.figures: dict = {}
        self.log = open(out / "gpu_proof.log", "a", encoding="utf-8")
        self.md = out / "gpu_report.md"
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
                        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                        # compiled kernels cached beside the corpus: a rerun on the same machine skips the compiles
                        TORCHINDUCTOR_CACHE_DIR=str(work / "inductor-cache"),
                        TRITON_CACHE_DIR=str(work / "triton-cache"))
        if plan.device == "cpu":
            self.env["CUDA_VISIBLE_DEVICES"] = ""      # the dry run must not touch a GPU even where one exists

    def left(self) -> float:
        return self.plan.budget - (time.monotonic() - self.t0)

    def box(self, name: str) -> float:
        return min(self.plan.boxes[name], self.left())

    def append(self, text: str) -> None:
        """Append to gpu_report.md now (flushed and closed: a kill a moment later keeps it)."""
        with open(self.md, "a", encoding="utf-8") as f:
            f.write(text.rstrip("\n") + "\n")

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        self.log.write(f"\n===== {name}: {' '.join(map(str, cmd))}\n")
        self.log.flush()
        return subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=self.env, cwd=ROOT, start_new_session=True)

    def finish(self, name: str, proc: subprocess.Popen, timeout: float, t_start: float,
               soft_stop: float | None = None) -> dict:
        """Wait for ``proc`` (SIGTERM at ``soft_stop`` seconds if given: the trainers save and exit), kill its
        whole process group at ``timeout``; record status, seconds and output."""
        status = "ok"
        try:
            if soft_stop is not None and soft_stop < timeout:
                try:
                    output, _ = proc.communicate(timeout=max(soft_stop, 0.1))
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGTERM)
                    output, _ = proc.communicate(timeout=max(timeout - soft_stop, 1))
            else:
                output, _ = proc.communicate(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            status = "timeout"
        if status == "ok" and proc.returncode not in (0, 128 + signal.SIGTERM):
            status = f"failed (exit {proc.returncode})"
        seconds = time.monotonic() - t_start
        self.log.write(output or "")
        self.log.write(f"===== {name}: {status} in {seconds:.1f} s\n")
        self.log.flush()
        step = {"step": name, "status": status, "seconds": round(seconds, 1), "box_s": round(timeout, 1),
                "output": output or ""}
        self.steps.append(step)
        return step

    def run(self, name: str, cmd: list[str], soft_stop: float | None = None) -> dict:
        if not self.plan.boxes.get(name):
            return {"step": name, "status": "not in this mode", "seconds": 0.0, "box_s": 0.0, "output": ""}
        timeout = self.box(name)
        if timeout < min(5, self.plan.boxes[name]):
            step = {"step": name, "status": "skipped (budget spent)", "seconds": 0.0, "box_s": 0.0, "output": ""}
            self.steps.append(step)
            return step
        t = time.monotonic()
        return self.finish(name, self.start(name, cmd), timeout, t, soft_stop)

    def skip(self, name: str, why: str) -> None:
        if self.plan.boxes.get(name):
            self.steps.append({"step": name, "status": f"skipped ({why})", "seconds": 0.0, "box_s": 0.0,
                               "output": ""})
            self.report_step(self.steps[-1])

    def report_step(self, step: dict, body: str = "") -> None:
        """Append one finished step's section to gpu_report.md and rewrite gpu_report.json."""
        text = [f"\n## {step['step']}: {step['status']} in {step['seconds']:.0f} s (box {step['box_s']:.0f} s)"]
        if body:
            text += ["", body]
        if step["status"] != "ok" and step["output"]:
            text += ["", "Last lines:", "", "```", "\n".join(step["output"].splitlines()[-15:]), "```"]
        self.append("\n".join(text))
        self.write_json()

    def write_json(self) -> None:
        data = {"mode": self.mode, "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                "wall_s": round(time.monotonic() - self.t0, 1), "budget_s": self.plan.budget,
                "figures": self.figures,
                "steps": [{k: v for k, v in s.items() if k != "output"} for s in self.steps]}
        (self.out / "gpu_report.json").write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n",
                                                  encoding="utf-8")


def xiaolm(*args) -> list[str]:
    return [sys.executable, "-m", "xiaolm", *map(str, args)]


def last_json(text: str) -> dict:
    """The last line of a step's output that is a JSON object (our helpers print their figures that way)."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return {}


def table_lines(text: str) -> str:
    """The benchmark tables of a step's output (what the report quotes), without progress noise."""
    keep = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("Warning", "W1", "I1", "  warnings"))]
    return "\n".join(keep[-40:])


# ------------------------------------------------------------------------------------------- sub-commands


def cmd_env(args) -> None:
    """Environment facts and a measured bf16 (GPU) / fp32 (CPU) matmul rate, as one JSON line."""
    import importlib.metadata as md

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda_available": torch.cuda.is_available()}
    for dist in ("transformers", "tokenizers", "safetensors", "numpy", "jieba", "datasketch", "zhconv", "OpenCC",
                 "gguf", "fastapi", "starlette", "pydantic", "uvicorn", "peft", "triton"):
        try:
            info[dist] = md.version(dist)
        except md.PackageNotFoundError:
            info[dist] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0),
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))), memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    sms=props.multi_processor_count)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["driver"], info["max_sm_clock"], info["power_limit"] = [s.strip() for s in smi.stdout.split(",")][:3]
        except Exception as exc:  # nvidia-smi missing is a fact for the report, not a failure
            info["driver"] = f"nvidia-smi: {exc}"
        from xiaolm.train.dist import device_peak_flops

        info["datasheet_bf16_tflops"] = (device_peak_flops("cuda") or 0) / 1e12 or None
        n, dtype, reps = 8192, torch.bfloat16, 10
        dev = "cuda"
    else:
        n, dtype, reps, dev = 512, torch.float32, 5, "cpu"
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    if dev == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if dev == "cuda":
        torch.cuda.synchronize()
    info["matmul"] = f"{n}x{n}x{n} {str(dtype).split('.')[-1]}"
    info["matmul_tflops"] = round(2 * n**3 * reps / (time.perf_counter() - t) / 1e12, 3)
    print(json.dumps(info))


def cmd_timed_pretrain(args) -> None:
    """The quickstart at GPU size: pretrain with the TinyStories recipe's settings for about ``--seconds``.

    A few calibration steps run eagerly (no compile: compiling for calibration and again for the run cost two cold
    compiles); the run is sized from that eager step time, less ``--compile-reserve`` seconds for the run's one
    compile, so its schedule ends inside the box (the compiled steps are faster, so it ends early rather than late).
    Then 5 sampled stories, their rep-4 and distinct-2, and the figures as one JSON line."""
    import copy

    import torch
    import yaml

    from xiaolm.config import parse_config
    from xiaolm.infer.generate import SamplingConfig, generate
    from xiaolm.model.io import load_model
    from xiaolm.quickstart import OPENINGS, calibrate_step_time
    from xiaolm.tasks.constraints import aggregate_repetition, repetition_metrics
    from xiaolm.train.pretrain import PretrainConfig, pretrain

    t0 = time.monotonic()
    recipe = yaml.safe_load((ROOT / "configs" / "tinystories-zh.yaml").read_text(encoding="utf-8"))["pretrain"]
    path = Path(args.out).with_suffix(".recipe.yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    argv = ["--config", str(path), "--data", args.data, "--out", args.out, "--preset", args.preset,
            "--seq-len", str(args.seq_len), "--micro-batch-size", str(args.micro_batch), "--device", args.device,
            "--no-progress", "--no-tensorboard", "--keep-last", "1", "--save-every", "0"]
    if args.device == "cpu":     # the dry run: no compile, no accumulation, plain loss
        argv += ["--no-compile", "--global-batch-tokens", str(args.seq_len * args.micro_batch),
                 "--loss-chunk-size", "0", "--eval-tokens", "4096", "--sample-tokens", "16"]
    pcfg, _ = parse_config(PretrainConfig, argv, prog="gpu_proof pretrain", description="")
    eager = copy.deepcopy(pcfg)
    eager.train.compile = False
    accum = max(1, pcfg.train.global_batch_tokens // (args.seq_len * args.micro_batch)
                if pcfg.train.global_batch_tokens else 1)
    step_s = calibrate_step_time(eager) * accum
    left = args.seconds - (time.monotonic() - t0) - (args.compile_reserve if pcfg.train.compile else 0)
    # evaluations, samples and checkpoints take ~20%
    pcfg.train.max_steps = max(10, int(left * 0.8 / step_s))
    pcfg.train.max_tokens = None
    pcfg.train.warmup_steps = min(pcfg.train.warmup_steps, max(1, pcfg.train.max_steps // 10))
    pcfg.train.eval_every = max(5, pcfg.train.max_steps // 2)
    pcfg.train.log_every = max(1, pcfg.train.max_steps // 20)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    summary = pretrain(pcfg)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    rows = [json.loads(x) for x in (Path(args.out) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("kind") == "train"]
    tail = train[len(train) // 2:] or train       # the second half: after compile and warm-up
    model, tokenizer, _ = load_model(args.out, device=args.device)
    stories = generate(model, tokenizer, OPENINGS, SamplingConfig(max_new_tokens=args.sample_tokens, temperature=0.8,
                                                                  top_k=50, seed=0))
    rep = aggregate_repetition([repetition_metrics(t) for t in stories])
    print(json.dumps({
        "steps": pcfg.train.max_steps, "step_s_calibrated_eager": round(step_s, 4),
        "tokens": train[-1]["tokens"] if train else 0,
        "val_loss": round(summary["val_loss"], 4) if summary.get("val_loss") is not None else None,
        "val_bpc": round(summary["val_bpc"], 4) if summary.get("val_bpc") is not None else None,
        "tokens_per_s": round(sum(r["tokens_per_s"] for r in tail) / max(1, len(tail))),
        "mfu": round(sum(r.get("mfu", 0) for r in tail) / max(1, len(tail)), 4) if tail and "mfu" in tail[-1] else None,
        "peak_mem_gib": round(peak, 2) if peak is not None else None,
        "rep4": None if rep["rep4"] is None else round(rep["rep4"], 4),
        "distinct2": None if rep["distinct2"] is None else round(rep["distinct2"], 4),
        "wall_s": round(time.monotonic() - t0, 1),
        "samples": [o + s.strip() for o, s in zip(OPENINGS, stories)],
    }, ensure_ascii=False))


def cmd_profile(args) -> None:
    """torch.profiler over a few training steps of our model (compiled, bf16, fused AdamW, chunked CE on a GPU):
    the top kernels by device time, and a Chrome trace (gzipped) at ``--trace``."""
    import gzip
    import shutil

    import torch
    from torch.profiler import ProfilerActivity, profile

    from xiaolm.model.llama import Llama, LlamaConfig

    gpu = torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    h, layers, heads, mlp, vocab, batch, seq = (512, 8, 8, 1376, 64793, 64, 512) if gpu else (64, 2, 4, 176, 512, 2, 64)
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=mlp, num_hidden_layers=layers,
                              num_attention_heads=heads, num_key_value_heads=heads,
                              max_position_embeddings=seq)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    step_model = torch.compile(model) if gpu else model
    x = torch.randint(0, vocab, (batch, seq + 1), device=dev)

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=gpu):
            loss = step_model(x[:, :-1], targets=x[:, 1:], loss_chunk_size=8192 if gpu else 0).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        if gpu:
            torch.cuda.synchronize()
    key = "cuda_time_total" if gpu else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15))
    raw = Path(args.trace).with_suffix("")
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as src, gzip.open(args.trace, "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    print(json.dumps({"trace": str(args.trace), "shape": f"{h}x{layers} v{vocab} batch {batch}x{seq}"}))


def cmd_install_plan(args) -> None:
    """Wheels in ``--wheels`` whose distribution the running Python lacks or has in an older version (checked,
    never assumed: a newer image keeps its own)."""
    import importlib.metadata as md

    from packaging.version import Version

    folder = Path(args.wheels)
    for whl in sorted(folder.glob("*.whl")) if folder.is_dir() else []:
        name, version = whl.name.split("-")[:2]
        try:
            have = md.version(name.replace("_", "-"))
        except md.PackageNotFoundError:
            have = None
        if have is None or Version(have) < Version(version):
            print(whl)
            print(f"install {name} {version} (image: {have or 'missing'})", file=sys.stderr)
        else:
            print(f"keep the image's {name} {have} (carried {version})", file=sys.stderr)


# -------------------------------------------------------------------------------------------------- report


def instruct_figures(res: dict) -> dict:
    """The headline numbers of an ``eval instruct`` result."""
    rep = res.get("repetition", {})
    out = {"samples": res.get("samples"), "all constraints met": res.get("all_constraints", {}).get("rate"),
           "declared words used": res.get("words", {}).get("rate"), "rep4": rep.get("rep4"),
           "mean chars": rep.get("mean_chars"), "bleu4": res.get("bleu4"), "rouge_l": res.get("rouge_l")}
    for name, c in res.get("constraints", {}).items():
        out[f"{name} met"] = c.get("rate")
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}



def env_line(env: dict) -> str:
    return (f"Device: {env.get('gpu', 'cpu')}, driver {env.get('driver', '-')}, CUDA {env.get('cuda', '-')}; "
            f"Python {env.get('python')}, torch {env.get('torch')}, transformers {env.get('transformers')}; "
            f"measured {env.get('matmul', '')} matmul {env.get('matmul_tflops', '?')} TFLOP/s"
            + (f" (datasheet {env['datasheet_bf16_tflops']:.0f})" if env.get("datasheet_bf16_tflops") else ""))


def figure_table(prefix: str, figures: dict, keys) -> str:
    rows = ["| figure | value |", "|---|---|"]
    rows += [f"| {prefix} {k} | {figures.get(k)} |" for k in keys if k in figures]
    return "\n".join(rows)


def final_summary(runner: Runner) -> None:
    """The closing section: every step's status, seconds and box, and the wall time against the budget."""
    wall = time.monotonic() - runner.t0
    md = ["", "## Summary", "", f"Wall time {wall:.0f} s of a {runner.plan.budget:.0f} s budget.", "",
          "| step | status | seconds | box |", "|---|---|---|---|"]
    md += [f"| {s['step']} | {s['status']} | {s['seconds']:.0f} | {s['box_s']:.0f} |" for s in runner.steps]
    runner.append("\n".join(md))
    runner.write_json()


# ---------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sub", nargs="?", default="proof",
                    choices=["proof", "env", "timed-pretrain", "install-plan", "profile"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="also profile a few training steps (top kernels in the log, OUT/trace.json.gz)")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT") or "out/gpu_proof")
    ap.add_argument("--work", default=None, help="scratch directory for corpora, runs and the compile caches "
                                                 "(default: OUT/work)")
    # sub-command arguments
    ap.add_argument("--data")
    ap.add_argument("--preset")
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--micro-batch", type=int)
    ap.add_argument("--device")
    ap.add_argument("--seconds", type=float)
    ap.add_argument("--compile-reserve", type=float, default=0.0)
    ap.add_argument("--sample-tokens", type=int, default=120)
    ap.add_argument("--wheels", default=".whl")
    ap.add_argument("--trace", default="trace.json.gz")
    args = ap.parse_args(argv)
    subs = {"env": cmd_env, "timed-pretrain": cmd_timed_pretrain, "install-plan": cmd_install_plan,
            "profile": cmd_profile}
    if args.sub in subs:
        subs[args.sub](args)
        return 0

    plan = DRY if args.dry_run else (QUICK if args.quick else FULL)
    mode = "dry-run (CPU)" if args.dry_run else ("quick" if args.quick else "full")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve() if args.work else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    r = Runner(plan, out, work, mode)
    fig = r.figures
    me = [sys.executable, str(Path(__file__).resolve())]
    gpu = plan.device == "cuda"
    r.md.write_text(f"# xiaolm GPU proof ({mode}), {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC\n\n"
                    f"Budget {plan.budget:.0f} s; each section below was appended the moment its step finished "
                    f"(table rows the moment they were measured).\n", encoding="utf-8")

    # 1. the environment
    step = r.run("env", [*me, "env"])
    fig["env"] = last_json(step["output"])
    r.report_step(step, env_line(fig["env"]))
    if gpu and not fig["env"].get("cuda_available"):
        r.append("\nno CUDA device: the GPU steps cannot run; use --dry-run on a machine without a GPU")
        final_summary(r)
        return 1

    # the corpus, on the CPU cores, while the GPU runs the headline
    stories, prepared, tok, shards, instruct = (work / "stories.jsonl", work / "prepared", work / "tokenizer",
                                                work / "shards", work / "instruct")
    chain = " && ".join([
        " ".join(xiaolm("data", "synth", "--num", plan.stories, "--seed", 0, "--out", stories)),
        " ".join(xiaolm("data", "prepare", stories, "--out", prepared, "--field", "story_zh", "--quiet")),
        " ".join(xiaolm("tokenizer", "train", prepared, "--out", tok, "--vocab-size", plan.vocab)),
        " ".join(xiaolm("data", "tokenize", prepared, "--tokenizer", tok, "--out", shards, "--no-progress")),
        " ".join(xiaolm("data", "instruct", stories, "--out", instruct, "--limit", max(2000, plan.stories // 20),
                        "--heldout-fraction", 0.1)),
    ])
    if (shards / "meta.json").is_file() and (instruct / "heldout.jsonl").is_file():
        chain = "echo the corpus of an earlier run is reused"   # a rerun on the same machine
    data_box = plan.boxes["data"]
    data_t = time.monotonic()
    data_proc = r.start("data", ["bash", "-c", chain])

    # 2. the headline: one shape, ours compiled vs transformers compiled, each row appended as it is measured
    r.append("\n## train_headline (rows appended as measured)\n")
    step = r.run("train_headline", [sys.executable, "bench/train_throughput.py", *plan.train_args,
                                    "--append", r.md])
    r.report_step(step)

    # 3. the quickstart at GPU size, on the corpus built meanwhile
    data_step = r.finish("data", data_proc, max(1.0, data_box - (time.monotonic() - data_t)), data_t)
    data_step["box_s"] = round(data_box, 1)
    r.report_step(data_step)
    run, sft = work / "run", work / "sft"
    have_data = data_step["status"] == "ok"
    if have_data:
        step = r.run("quickstart", [*me, "timed-pretrain", "--data", shards, "--out", run, "--preset", plan.preset,
                                    "--seq-len", plan.seq_len, "--micro-batch", plan.micro_batch, "--device",
                                    plan.device, "--seconds", min(plan.pretrain_s, r.box("quickstart") - 10),
                                    "--compile-reserve", plan.compile_reserve_s,
                                    "--sample-tokens", 120 if gpu else 16])
        fig["quickstart"] = last_json(step["output"])
        q = fig["quickstart"]
        body = figure_table("quickstart", q, ("steps", "tokens", "val_loss", "val_bpc", "tokens_per_s", "mfu",
                                              "peak_mem_gib", "rep4", "distinct2", "wall_s"))
        if q.get("samples"):
            body += "\n\nSampled stories:\n\n" + "\n".join(f"- {x}" for x in q["samples"])
        r.report_step(step, body)
    else:
        r.skip("quickstart", "no corpus")

    # 4. the GPU tests, each under its own timeout (one hanging compile cannot eat the box)
    per_test = ["--timeout", str(max(10, int(plan.boxes["pytest_gpu"] // 2)))] if _has("pytest_timeout") else []
    step = r.run("pytest_gpu", [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider",
                                *per_test, "tests/test_gpu.py"])
    if step["status"] != "not in this mode":
        m = re.search(r"(\d+ (passed|failed|skipped)[^\n]*) in [\d.]+s", step["output"])
        fig["pytest_gpu"] = m.group(1) if m else None
        r.report_step(step, f"pytest -m gpu: {fig['pytest_gpu']}\n\n```\n{table_lines(step['output'])}\n```")

    # 5. decode throughput, each row appended as it is measured
    if plan.boxes.get("decode"):
        r.append("\n## decode (rows appended as measured)\n")
        step = r.run("decode", [sys.executable, "bench/generate_throughput.py", *plan.generate_args,
                                "--append", r.md])
        r.report_step(step)

    # 6. the rest: SFT (a finite schedule sized to end inside its box) and eval instruct on the quickstart's model,
    # the GPU speedrun track, the profile
    if have_data and (run / "summary.json").is_file() and plan.boxes.get("sft"):
        step_s = fig.get("quickstart", {}).get("step_s_calibrated_eager") or 1.0
        # ~25 s of the box go to starting Python, loading, the final checkpoint and report; half the rest to steps
        sft_steps = max(10, int((plan.boxes["sft"] - 25) * 0.5 / step_s))
        step = r.run("sft", xiaolm("sft", run, "--config", "configs/sft-stories.yaml", "--data",
                                   instruct / "train.jsonl", "--out", sft, "--device", plan.device, "--no-progress",
                                   "--no-tensorboard", "--eval-every", 0, "--max-steps", sft_steps,
                                   "--micro-batch-size", plan.micro_batch, "--seq-len", plan.seq_len,
                                   "--no-compile", "--eval-conversations", 16, "--sample-prompts", 1,
                                   "--sample-tokens", 16),
                     soft_stop=plan.boxes["sft"] - 5)   # a safety net: the trainer saves and exits
        fig["sft_steps"] = sft_steps
        r.report_step(step, f"SFT: {sft_steps} steps (sized from the eager step time {step_s:.3f} s)")
        if any(p.name.startswith("step-") for p in (sft / "checkpoints").glob("*")):
            result = work / "eval_instruct.json"
            step = r.run("eval_instruct", xiaolm("eval", "instruct", sft, "--data", instruct / "heldout.jsonl",
                                                 "--limit", plan.instructions, "--out", result, "--device",
                                                 plan.device, "--max-new-tokens", plan.eval_new_tokens))
            if result.is_file():
                fig["eval_instruct"] = instruct_figures(json.loads(result.read_text(encoding="utf-8")))
            r.report_step(step, figure_table("eval instruct", fig.get("eval_instruct", {}),
                                             list(fig.get("eval_instruct", {}))))
        else:
            r.skip("eval_instruct", "no SFT checkpoint")
    else:
        r.skip("sft", "no quickstart model")
        r.skip("eval_instruct", "no quickstart model")
    if have_data and plan.boxes.get("speedrun"):
        # the recipe against the old defaults on the proof's corpus (its --cache holds shards/ and tokenizer/)
        step = r.run("speedrun", [sys.executable, "bench/speedrun.py", *plan.speedrun_args, "--cache", work,
                                  "--out", out / "speedrun"])
        r.report_step(step, "```\n" + table_lines(step["output"]) + "\n```")
    else:
        r.skip("speedrun", "no corpus")
    if args.profile and plan.boxes.get("profile"):
        step = r.run("profile", [*me, "profile", "--trace", out / "trace.json.gz"])
        r.report_step(step, "```\n" + table_lines(step["output"]) + "\n```")
    final_summary(r)
    print(r.md.read_text(encoding="utf-8"))
    return 0 if all(s["status"] == "ok" for s in r.steps) else 1


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    sys.exit(main())
