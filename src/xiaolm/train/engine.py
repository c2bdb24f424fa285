"""The training engine every training verb shares: pretraining, SFT, reward model, DPO, GRPO.

A verb supplies three functions and the engine does the rest:
- ``batch_fn(step, micro) -> dict`` of CPU tensors. It must be a pure function of (step, micro, rank), so resuming
  needs nothing but the step number to continue with exactly the batches the uninterrupted run would have seen;
- ``loss_fn(model, batch) -> (loss_sum, n, metrics)``: the micro-batch's loss summed over its ``n`` units (label
  tokens for language modelling, pairs or sequences for preference losses) and a dict of scalar tensors. The engine
  divides the step's summed loss by the units of all its micro-batches on all ranks (torchtitan's rule), so a
  micro-batch with few real tokens weighs less than a full one instead of as much;
- ``eval_fn(model, step) -> dict`` (optional), returning at least ``val_loss`` to track the best checkpoint.

``Trainer.train_step`` runs one optimizer step on its own (calibration, tests); ``fit`` loops over it. Subclasses
add files to every checkpoint (``checkpoint_files``) and state to trainer.pt (``extra_state`` / ``load_extra_state``).

The engine owns: device and precision, the AdamW optimiser (fused where available, weight decay on matrices only),
warmup + decay schedule over the run's real length, gradient accumulation, clipping, a non-finite guard that never
lets a NaN reach the weights or a checkpoint, DDP/FSDP under torchrun, atomic checkpoints with exact resume, Ctrl-C
and SIGTERM handling, logging (console progress, metrics.jsonl, TensorBoard), the loss-curve PNG and a report card.
"""
from __future__ import annotations

import contextlib
import errno
import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch

from xiaolm.config import opt, save_config
from xiaolm.model.io import MODEL_CONFIG, CheckpointError, find_checkpoint, step_checkpoints, verify_checkpoint
from xiaolm.rundir import claim_run_dir
from xiaolm.train.checkpoint import (full_model_state, full_optimizer_state, load_model_and_optimizer, load_trainer_state,
                                     resolve_checkpoint_choice, rng_state, save_checkpoint, set_rng_state)
from xiaolm.train.dist import (DistEnv, auto_help, autocast_for, configure_device, device_peak_flops,
                               resolve_device_defaults, resolve_precision, setup_distributed, teardown_distributed)
from xiaolm.train.memory import OOM_FALLBACK_STEPS, MemoryCreep, memory_stats, split_rows
from xiaolm.train.metrics import MetricsLog, _Progress, plot_loss_curve, resolve_tensorboard
from xiaolm.train.prefetch import _Prefetcher, _to_device
from xiaolm.train.schedule import lr_at
from xiaolm.utils import human, log

# ----------------------------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    max_steps: Optional[int] = opt(None, "optimizer steps for the whole run (default: from max_tokens or epochs)")
    max_tokens: Optional[int] = opt(None, "token budget for the whole run; sets max_steps when that is not given")
    micro_batch_size: int = opt(16, "sequences per forward/backward on each device")
    grad_accum_steps: int = opt(1, "micro-batches accumulated per optimizer step")
    lr: float = opt(1e-3, "peak learning rate")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of lr")
    warmup_steps: int = opt(100, "linear warmup steps (capped at 10% of the run)")
    schedule: Literal["cosine", "linear", "constant", "wsd"] = opt(
        "cosine", "decay after warmup: cosine, linear, constant, or wsd (constant, then linear over decay_fraction)"
    )
    decay_fraction: float = opt(0.45, "with schedule wsd: the final fraction of the run that decays linearly")
    optimizer: Literal["adamw", "muon"] = opt(
        "adamw", "adamw, or muon: Muon for the hidden matrices (attention, MLP), AdamW for embeddings/head/norms"
    )
    muon_lr: float = opt(0.01, "with optimizer muon: peak learning rate of the hidden matrices")
    adam_lr: Optional[float] = opt(None, "with optimizer muon: peak lr of the AdamW groups (default: lr)")
    muon_momentum: float = opt(0.95, "with optimizer muon: Muon's (Nesterov) momentum")
    muon_weight_decay: float = opt(0.0, "with optimizer muon: decoupled weight decay of the hidden matrices")
    weight_decay: float = opt(0.1, "AdamW weight decay (matrices only, never norms or embeddings)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    eps: float = opt(1e-8, "AdamW epsilon")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 disables)")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = opt(
        "auto", f"{auto_help('precision')} (bf16 autocast where the GPU supports it)"
    )
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps")
    compile: Optional[bool] = opt(None, f"torch.compile the model (default {auto_help('compile')})")
    seed: int = opt(1337, "seed for initialisation and data order", short="--seed")
    log_every: int = opt(10, "log every N optimizer steps")
    eval_every: int = opt(200, "evaluate (and save) every N steps; 0: only at the end")
    save_every: int = opt(0, "also save every N steps (0: at evaluations and the end)")
    keep_last: int = opt(3, "checkpoints to keep besides the best")
    resume: bool = opt(False, "continue from OUT's latest checkpoint")
    resume_from: Optional[str] = opt(
        None, "continue from this checkpoint instead (implies --resume): a step number or a checkpoint directory"
    )
    overwrite: bool = opt(False, "OUT already holds a run: empty it first and start over (without this or --resume, "
                                 "such an OUT is refused)")
    stop_at_step: Optional[int] = opt(
        None, "save and exit at this step, as if interrupted (the schedule still spans max_steps)"
    )
    on_nonfinite: Literal["stop", "skip"] = opt(
        "stop", "a NaN/inf loss or gradient: stop with a message, or skip the step and go on"
    )
    max_skipped_steps: int = opt(20, "with on_nonfinite=skip: stop after this many skipped steps")
    loss_chunk_size: Optional[int] = opt(
        None, f"rows per chunk for the fused linear + cross-entropy, 0: plain (default {auto_help('loss_chunk_size')})")
    prefetch: int = opt(2, "batches prepared ahead by a background thread (pinned on GPU); 0 disables")
    fsdp: bool = opt(False, "shard parameters with FSDP2 (fully_shard) under torchrun")
    peak_flops: Optional[float] = opt(None, "device peak FLOP/s for MFU (default: looked up by GPU name)")
    tensorboard: bool = opt(True, "write TensorBoard events when tensorboard is installed")
    progress: bool = opt(True, "a progress bar on a terminal (off: plain log lines, as in files and CI logs)")



# ----------------------------------------------------------------------------------------------- engine


class TrainingDiverged(RuntimeError):
    pass


class _StopFlag:
    """Ctrl-C / SIGTERM set a flag; the loop saves at the end of the current step and exits cleanly."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old = {}

    def install(self):
        if threading_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.signum is not None:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.signum = signum
        log(f"\n{signal.Signals(signum).name} received: finishing this step, saving a checkpoint, then exiting")

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@dataclass
class FitResult:
    step: int
    tokens: int
    elapsed: float
    final_loss: Optional[float]
    best_val_loss: Optional[float]
    last_eval: dict
    interrupted: bool
    exit_code: int

    def summary(self, total_steps: int) -> dict:
        """The figures every training verb's summary.json starts with."""
        return {
            "steps": self.step, "total_steps": total_steps, "tokens": self.tokens, "wall_s": round(self.elapsed, 1),
            "tokens_per_s": round(self.tokens / max(self.elapsed, 1e-9), 1), "final_train_loss": self.final_loss,
            "best_val_loss": self.best_val_loss, "interrupted": self.interrupted, "exit_code": self.exit_code,
        }


@dataclass
class StepResult:
    loss: torch.Tensor  # this rank's share of the step's mean loss (the shares of all ranks add up to it)
    grad_norm: torch.Tensor
    bad: torch.Tensor  # a non-finite loss or gradient: the update was skipped
    tokens: int  # input tokens this rank processed
    metrics: dict  # the loss_fn metrics, averaged over the micro-batches


class Trainer:
    """Runs ``batch_fn``/``loss_fn``/``eval_fn`` with everything a long run needs (see the module docstring)."""

    def __init__(
        self,
        cfg: TrainConfig,
        model: torch.nn.Module,
        run_dir: str | Path,
        *,
        total_steps: int,
        dist_env: DistEnv,
        full_config: Any = None,
        model_config: Optional[dict] = None,
        tokenizer=None,
        flops_per_token: Optional[float] = None,
        extra_meta: Optional[dict] = None,
        param_groups: Optional[list[dict]] = None,
        name: str = "train",
        new_run_hint: str = "start a new run with another --out",
        oom_fallback: bool = False,
    ):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.env = dist_env
        self.device = dist_env.device
        self.full_config = full_config
        self.model_config = model_config if model_config is not None else model.config.to_dict()
        self.tokenizer = tokenizer
        self.flops_per_token = flops_per_token
        self.extra_meta = extra_meta or {}
        self.name = name
        self.new_run_hint = new_run_hint
        # Out of memory in the first steps: split every micro-batch in two and retry (the loss_fn's units must add
        # up across rows, as language-model token counts do; train/memory.py).
        self.oom_fallback = oom_fallback
        self.micro_split = 1
        self._resume_ckpt: Optional[Path] = None
        self._resume_checked = False
        configure_device(self.device)
        resolve_device_defaults(cfg, self.device)  # in place: the verb's loss and config.yaml see what runs
        self.amp_dtype = resolve_precision(cfg.precision, self.device)
        self.raw_model = model.to(self.device)
        self.model = self._wrap(self.raw_model)
        groups = param_groups if param_groups is not None else self.raw_model.param_groups(cfg.weight_decay)
        self.params = [p for g in groups for p in g["params"]]
        from xiaolm.train.optim import build_optimizer

        self.optimizer, self.skips_on_device = build_optimizer(cfg, self.raw_model, groups, self.device,
                                                               sharded=cfg.fsdp and dist_env.distributed)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.peak_flops = cfg.peak_flops or device_peak_flops(self.device)

    # ------------------------------------------------------------------------------------------- setup

    def _wrap(self, model):
        if self.cfg.fsdp:
            if not self.env.distributed:
                log("note: --fsdp has no effect without torchrun; training unsharded")
            else:
                from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

                mp = MixedPrecisionPolicy(param_dtype=self.amp_dtype) if self.amp_dtype else MixedPrecisionPolicy()
                for layer in model.model.layers:
                    fully_shard(layer, mp_policy=mp)
                fully_shard(model, mp_policy=mp)
        wrapped = model
        if self.env.distributed and not self.cfg.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.env.local_rank] if self.device.startswith("cuda") else None
            wrapped = DDP(wrapped, device_ids=ids)
        if self.cfg.compile:
            # Compile the DDP module, not DDP around a compiled one: dynamo's DDPOptimizer then splits the graph at
            # DDP's bucket boundaries, so each bucket's all-reduce overlaps the rest of the backward (torchtitan
            # compiles before replicating too); DDP around one opaque compiled graph can only reduce at its end.
            wrapped = torch.compile(wrapped)
        return wrapped

    def autocast(self):
        return autocast_for(self.device, self.amp_dtype)()

    # ------------------------------------------------------------------------------------------- state

    def model_state(self) -> dict:
        """The weights each checkpoint holds (``LoraTrainer``: the peft model's)."""
        return full_model_state(self.raw_model, self.cfg.fsdp and self.env.distributed)

    def save(self, step: int, tokens: int, elapsed: float, best: bool, best_val: Optional[float], last_eval: dict):
        sd = self.model_state()
        opt_state = full_optimizer_state(self.raw_model, self.optimizer, self.cfg.fsdp and self.env.distributed)
        if not self.env.is_main:
            return None
        trainer_state = {
            "step": step,
            "tokens": tokens,
            "elapsed": elapsed,
            "optimizer": opt_state,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": rng_state(),
            "best_val_loss": best_val,
            "world_size": self.env.world_size,
            "extra": self.extra_state(),
        }
        meta = {
            "kind": self.name,
            "tokens": tokens,
            "elapsed_s": round(elapsed, 1),
            "total_steps": self.total_steps,
            "tokenizer_fingerprint": getattr(self.tokenizer, "fingerprint", None),
            **{k: v for k, v in last_eval.items() if isinstance(v, (int, float, str))},
            **self.extra_meta,
        }
        return save_checkpoint(
            self.run_dir, step, self.raw_model, self.model_config, meta, trainer_state,
            keep_last=self.cfg.keep_last, best=best, state_dict=sd, extra_files=self.checkpoint_files() or None,
        )

    # Hooks for subclasses: files written inside every checkpoint (atomically, with their sha256) and state kept in
    # trainer.pt for an exact resume.

    def checkpoint_files(self) -> dict[str, bytes]:
        """Extra files for each checkpoint, by path inside the checkpoint directory (rank 0 only)."""
        return {}

    def extra_state(self) -> dict:
        """Picklable state saved in trainer.pt with the optimizer's (rank 0 only)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restores what ``extra_state`` returned, on resume (every rank)."""

    @property
    def resuming(self) -> bool:
        return bool(self.cfg.resume or self.cfg.resume_from)

    def resume_checkpoint(self) -> Optional[Path]:
        """The checkpoint a --resume / --resume-from run continues from, verified and checked against the run as
        configured now (None: nothing to resume). Call it before writing anything into the run directory: a
        resume that does not fit is refused while the run is still intact."""
        if not self._resume_checked:
            self._resume_ckpt = self._find_resume_checkpoint()
            self._resume_checked = True
        return self._resume_ckpt

    def open_run_dir(self) -> None:
        """Check a resume against the run (``resume_checkpoint``), then create the run directory and write the
        tokenizer into it (main process only): every verb's first write, after nothing can be refused any more.
        The main process first claims the directory (``xiaolm.rundir``): its lock, held while this process lives,
        and the refusal of an existing run without --resume (--overwrite empties it)."""
        self._claim()
        self.resume_checkpoint()
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.tokenizer is not None:
                self.tokenizer.save(self.run_dir / "tokenizer")

    def _claim(self) -> None:
        if self.env.is_main:
            claim_run_dir(self.run_dir, resume=self.resuming, overwrite=self.cfg.overwrite, verb=self.name)

    def _find_resume_checkpoint(self) -> Optional[Path]:
        if not self.resuming:
            return None
        if self.cfg.resume_from:
            ckpt = resolve_checkpoint_choice(self.run_dir, self.cfg.resume_from)
        elif not step_checkpoints(self.run_dir / "checkpoints"):
            log(f"--resume: no checkpoint in {self.run_dir} yet; starting from scratch")
            return None
        else:
            ckpt = find_checkpoint(self.run_dir)
        meta = verify_checkpoint(ckpt)
        self._check_fits(ckpt, meta)
        return ckpt

    # Run settings besides the model config that a resumed run must share with its checkpoint.
    RESUME_KEYS = ("seq_len", "distill")

    def _check_fits(self, ckpt: Path, meta: dict) -> None:
        have = getattr(self.tokenizer, "fingerprint", None)
        want = meta.get("tokenizer_fingerprint")
        if want and have and want != have:
            raise CheckpointError(
                f"--resume: {ckpt} was trained with tokenizer {want}, but this run's data and tokenizer are "
                f"{have}; resume with the data and tokenizer the run started with, or {self.new_run_hint}")
        config_file = ckpt / MODEL_CONFIG
        saved = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        asked = json.loads(json.dumps(self.model_config))
        diffs = [f"{k} {saved.get(k)!r} -> {asked.get(k)!r}"
                 for k in sorted(set(saved) | set(asked)) if saved and saved.get(k) != asked.get(k)]
        diffs += [f"{k} {meta[k]!r} -> {self.extra_meta[k]!r}" for k in self.RESUME_KEYS
                  if k in meta and k in self.extra_meta and meta[k] != self.extra_meta[k]]
        if diffs:
            raise CheckpointError(
                f"--resume: {ckpt} was saved with other settings than asked for now ({', '.join(diffs)}); "
                f"resume with the run's own settings (see {self.run_dir / 'config.yaml'}), or {self.new_run_hint}")

    def _restore(self) -> Optional[dict]:
        ckpt = self.resume_checkpoint()
        if ckpt is None:
            return None
        state = load_trainer_state(ckpt)
        if state is None:
            raise CheckpointError(f"{ckpt}: holds weights only (no trainer.pt); cannot resume training from it")
        from safetensors.torch import load_file

        load_model_and_optimizer(self.raw_model, self.optimizer, load_file(str(ckpt / "model.safetensors")),
                                 state["optimizer"], self.cfg.fsdp and self.env.distributed)
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if state.get("world_size", 1) == self.env.world_size:
            set_rng_state(state["rng"])
        self.load_extra_state(state.get("extra") or {})
        log(f"resumed from {ckpt} (step {state['step']}, {human(state['tokens'])} tokens)")
        return state

    # ------------------------------------------------------------------------------------------- step

    def set_lr(self, step: int) -> float:
        lr = lr_at(step, self.cfg, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's and AdamW's own peaks (optim.py)
        return lr

    def train_step(self, batches: list[dict], loss_fn: Callable, step: int = 0) -> StepResult:
        """One optimizer step over ``batches`` (this rank's micro-batches, CPU or device tensors) at the schedule's
        learning rate for ``step``: accumulation, the global unit count, clipping, the loss scaler and the
        non-finite guard. The model is left in whatever train/eval mode it is in."""
        cfg, env = self.cfg, self.env
        self.set_lr(step)
        dev_type = self.device.split(":")[0]
        loss_sum = torch.zeros((), device=self.device)
        units = torch.zeros((), device=self.device)
        metrics: dict[str, torch.Tensor] = {}
        step_tokens = 0
        pieces = []
        for batch in batches:
            batch = dict(batch)  # the caller's batch keeps its count, for a retry after an out-of-memory error
            step_tokens += int(batch.pop("num_tokens", batch["input_ids"].numel()))
            pieces += split_rows(batch, self.micro_split)
        for micro, batch in enumerate(pieces):
            batch = _to_device(batch, self.device)
            sync_ctx = (
                self.model.no_sync()
                if env.distributed and not cfg.fsdp and micro < len(pieces) - 1
                else contextlib.nullcontext()
            )
            with sync_ctx:
                with self.autocast():
                    loss, n, extra = loss_fn(self.model, batch)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_sum += loss.detach().float()
            units += n.detach().float() if isinstance(n, torch.Tensor) else float(n)
            for k, v in (extra or {}).items():
                metrics[k] = metrics.get(k, 0) + v.detach().float() / len(pieces)
        if env.distributed:
            import torch.distributed as dist

            dist.all_reduce(units)
        units = units.clamp(min=1)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        # The gradients hold the summed loss, averaged over ranks by DDP/FSDP: divide by the global units instead.
        grads = [p.grad for p in self.params if p.grad is not None]
        scale = env.world_size / units
        if cfg.fsdp and env.distributed:  # DTensor gradients take a plain number
            scale = float(scale)
            for g in grads:
                g.mul_(scale)
        elif grads:
            torch._foreach_mul_(grads, scale)
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip, foreach=dev_type != "mps")
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
            grad_norm = grad_norm.full_tensor()
        step_loss = loss_sum / units  # this rank's share of the step's mean loss
        bad = ~torch.isfinite(step_loss)
        if self.scaler is None:
            bad = bad | ~torch.isfinite(grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self.skips_on_device:
            # Fused AdamW and our Muon skip the whole update on the device when found_inf is 1: no host sync, so the
            # only syncs are at log/eval/checkpoint points (the default recipe, Muon + AdamW, takes this path).
            self.optimizer.found_inf = bad.float()
            self.optimizer.step()
        elif not bool(bad):  # unfused AdamW (FSDP, MPS): one host sync a step
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(step_loss, grad_norm, bad, step_tokens, metrics)

    def _halve_micro_batch(self, step: int, steps_done: int, batches: list[dict]) -> bool:
        """After an out-of-memory error at ``step``: split every micro-batch in two and double the accumulation
        (the same global batch and, the loss being summed over units and divided by the step's, the same loss
        curve), say so, and record it in config.yaml. False where that cannot help or is not safe: past the first
        steps (memory that runs out later is a leak or a longer batch, not a wrong size), a verb whose units do not
        add up across rows, or micro-batches of one row."""
        rows = batches[0]["input_ids"].shape[0] // self.micro_split
        if not self.oom_fallback or steps_done >= OOM_FALLBACK_STEPS or rows < 2 or self.env.distributed:
            return False
        self.optimizer.zero_grad(set_to_none=True)  # the failed step's partial gradients
        self.micro_split *= 2
        cfg = self.cfg
        cfg.micro_batch_size = max(1, cfg.micro_batch_size // 2)
        cfg.grad_accum_steps = max(1, cfg.grad_accum_steps) * 2
        log(f"out of memory at step {step + 1}: micro-batch halved to {cfg.micro_batch_size}, accumulation doubled "
            f"to {cfg.grad_accum_steps} (same global batch and loss curve; recorded in config.yaml)")
        if self.env.is_main and self.full_config is not None:
            save_config(self.full_config, self.run_dir / "config.yaml")
        return True

    # ------------------------------------------------------------------------------------------- loop

    def fit(
        self,
        batch_fn: Callable[[int, int], dict],
        loss_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, torch.Tensor | int, dict]],
        eval_fn: Optional[Callable[[torch.nn.Module, int], dict]] = None,
    ) -> FitResult:
        cfg, env = self.cfg, self.env
        self._claim()  # a no-op after open_run_dir
        self.resume_checkpoint()  # before config.yaml is rewritten
        resolve_tensorboard(cfg)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if env.is_main and self.full_config is not None:
            save_config(self.full_config, self.run_dir / "config.yaml")
        start_step, tokens, elapsed_before, best_val = 0, 0, 0.0, None
        if self.resuming:
            state = self._restore()
            if state is not None:
                start_step, tokens = state["step"], state["tokens"]
                elapsed_before, best_val = state["elapsed"], state.get("best_val_loss")
        metrics = MetricsLog(self.run_dir, env.is_main, cfg.tensorboard, start_step if self.resuming else None)
        accum = max(1, cfg.grad_accum_steps)
        stop = _StopFlag().install()
        progress = _Progress(self.total_steps, start_step, enabled=env.is_main, bar=cfg.progress)

        nonfinite = torch.zeros((), device=self.device)
        creep = MemoryCreep()
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(self.device)
        skipped_total = 0
        interval_loss = torch.zeros((), device=self.device)
        interval_metrics: dict[str, torch.Tensor] = {}
        interval_steps, interval_tokens = 0, 0
        t_interval = time.perf_counter()
        t_start = time.perf_counter()
        last_eval: dict = {}
        last_loss: Optional[float] = None
        exit_code, interrupted = 0, False
        step = start_step
        feed = _Prefetcher(batch_fn, start_step, self.total_steps, accum, cfg.prefetch,
                           pin=self.device.startswith("cuda"))
        self.model.train()
        try:
            while step < self.total_steps:
                lr = lr_at(step, cfg, self.total_steps)
                batches = [feed.get(step, micro) for micro in range(accum)]
                while True:
                    try:
                        out = self.train_step(batches, loss_fn, step)
                        break
                    except torch.OutOfMemoryError:
                        if not self._halve_micro_batch(step, step - start_step, batches):
                            raise
                    if self.device.startswith("cuda"):  # out here the failed step's traceback, and with it its
                        torch.cuda.empty_cache()         # activations, is gone: hand their blocks back
                step_loss, grad_norm, bad = out.loss, out.grad_norm, out.bad
                for k, v in out.metrics.items():
                    interval_metrics[k] = interval_metrics.get(k, 0) + v
                nonfinite += bad.float()
                interval_loss += torch.where(bad, torch.zeros_like(step_loss), step_loss)
                interval_steps += 1
                step += 1
                tokens += out.tokens * env.world_size
                interval_tokens += out.tokens * env.world_size
                progress.update(step)

                is_last = step == self.total_steps
                want_log = step % max(1, cfg.log_every) == 0 or is_last
                want_eval = eval_fn is not None and (is_last or (cfg.eval_every > 0 and step % cfg.eval_every == 0))
                stopping = stop.signum is not None or (cfg.stop_at_step is not None and step >= cfg.stop_at_step)
                want_save = is_last or want_eval or stopping or (cfg.save_every > 0 and step % cfg.save_every == 0)
                n_bad = 0
                if want_log or want_save:
                    if env.distributed:  # every rank agrees on divergence; the logged loss is the global mean
                        import torch.distributed as dist

                        dist.all_reduce(nonfinite)
                        dist.all_reduce(interval_loss)  # each rank holds its share of the global mean
                    n_bad = int(nonfinite.item())  # the one host sync, at log/save points only
                    if n_bad:
                        skipped_total += n_bad
                        nonfinite.zero_()
                        where = f"between steps {step - interval_steps + 1} and {step}"
                        if cfg.on_nonfinite == "stop" or skipped_total > cfg.max_skipped_steps:
                            raise TrainingDiverged(
                                f"non-finite loss or gradient {where} (the update was skipped, so the weights and "
                                f"every checkpoint stay finite). Lower --lr, raise --warmup-steps, or pass "
                                f"--on-nonfinite skip; resume from the last checkpoint with --resume."
                            )
                        log(f"warning: skipped {n_bad} step(s) with a non-finite loss or gradient {where}")
                if want_log:
                    good_steps = max(1, interval_steps - n_bad)
                    now = time.perf_counter()
                    dt = max(now - t_interval, 1e-9)
                    loss_val = float(interval_loss.item()) / good_steps
                    last_loss = loss_val
                    tok_s = interval_tokens / dt
                    record = {
                        "kind": "train", "step": step, "tokens": tokens, "loss": round(loss_val, 6),
                        "lr": lr, "grad_norm": round(float(grad_norm), 4), "tokens_per_s": round(tok_s, 1),
                        "elapsed_s": round(elapsed_before + now - t_start, 2),
                    }
                    for k, v in interval_metrics.items():
                        record[k] = round(float(v) / interval_steps, 6)
                    if self.flops_per_token and self.peak_flops:
                        record["mfu"] = round(self.flops_per_token * tok_s / env.world_size / self.peak_flops, 4)
                    record.update(memory_stats(self.device))
                    if "mem_allocated_gib" in record:
                        creep_warning = creep.observe(record["mem_allocated_gib"] * 2**30, step)
                        if creep_warning:
                            progress.note(creep_warning)
                    if env.is_main:
                        metrics.write(record)
                    progress.show(record, self.total_steps, elapsed_before + now - t_start, step - start_step)
                    interval_loss.zero_()
                    interval_metrics = {}
                    interval_steps, interval_tokens = 0, 0
                    t_interval = time.perf_counter()
                improved = False
                if want_eval:
                    self.model.eval()
                    with torch.no_grad(), self.autocast():
                        last_eval = eval_fn(self.raw_model, step) or {}
                    self.model.train()
                    val = last_eval.get("val_loss")
                    if val is not None and (best_val is None or val < best_val):
                        best_val, improved = val, True
                    if env.is_main:
                        metrics.write({"kind": "eval", "step": step, "tokens": tokens, **last_eval})
                    progress.show_eval(step, last_eval)
                    t_interval = time.perf_counter()  # evaluation time is not training throughput
                if want_save:
                    elapsed = elapsed_before + time.perf_counter() - t_start
                    path = self.save(step, tokens, elapsed, improved, best_val, last_eval)
                    if path is not None:
                        progress.note(f"saved {path}")
                    t_interval = time.perf_counter()
                if stopping and not is_last:
                    interrupted = True
                    if stop.signum is not None:
                        exit_code = 128 + stop.signum
                        log(f"stopped by {signal.Signals(stop.signum).name} at step {step}; "
                            f"continue with the same command and --resume")
                    else:
                        log(f"stopped at step {step} as asked (--stop-at-step); continue with --resume")
                    break
        finally:
            feed.close()
            stop.restore()
            progress.close()
            metrics.close()
        elapsed = elapsed_before + time.perf_counter() - t_start
        if env.is_main:
            plot_loss_curve(self.run_dir, title=f"{self.name}: {self.run_dir.name}")
        return FitResult(step, tokens, elapsed, last_loss, best_val, last_eval, interrupted, exit_code)


def run_training(train_fn: Callable[[Any, DistEnv], dict], cfg: Any) -> tuple[dict, DistEnv]:
    """Run a training verb's function under torchrun or alone: set up the process group, turn the known failure
    kinds (divergence, a bad checkpoint, bad input) into one clear line, and always tear down."""
    from xiaolm.utils import fail

    env = setup_distributed(cfg.train.device)
    resolve_device_defaults(cfg.train, env.device)
    try:
        summary = train_fn(cfg, env)
    except (TrainingDiverged, CheckpointError, ValueError) as exc:
        raise fail(str(exc), code=1)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = exc.filename or getattr(cfg, "out", "the run directory")
        raise fail(f"no space left on device while writing {where}; the last checkpoint saved is intact: free "
                   f"some space and continue with --resume", code=1)
    finally:
        teardown_distributed()
    return summary, env
