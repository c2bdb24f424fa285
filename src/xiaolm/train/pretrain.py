"""``xiaolm pretrain``: train the model from scratch (or continue a model) on token shards.

Data order is a pure function of (seed, step): the training split is cut into non-overlapping windows of
``seq_len + 1`` tokens, each epoch visits them in a seeded permutation, and optimizer step ``s`` takes the next
``global batch`` windows, rank ``r`` its own disjoint slice. So ``--resume`` needs only the step to continue with
the very batches the uninterrupted run would have seen, and N processes see exactly what one process accumulating
N micro-batches sees.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

from xiaolm.config import opt, parse_config
from xiaolm.eval.loss import StreamEvaluator
from xiaolm.train.dist import DistEnv, setup_distributed
from xiaolm.train.distill import DistillSection
from xiaolm.train.engine import TrainConfig, Trainer, run_training
from xiaolm.train.schedule import resolve_steps
from xiaolm.utils import fail, human, log, seed_everything

DEFAULT_PROMPTS = ["从前，有一个小女孩叫莉莉。", "小明和他的狗", "有一天，小猫"]


@dataclass
class ModelSection:
    preset: str = opt("24m", "model size preset (xiaolm presets lists them): tiny, quickstart, 9m, 24m, 58m, "
                             "microstories, 134m, 256m")
    seq_len: int = opt(512, "context length in tokens")
    tie_word_embeddings: bool = opt(False, "share the input embedding with the output head (default: untied, "
                                           "measured better in docs/RECIPE.md)")
    rope_theta: float = opt(10000.0, "RoPE base")
    hidden_size: Optional[int] = opt(None, "override the preset's hidden size")
    intermediate_size: Optional[int] = opt(None, "override the preset's MLP size")
    num_hidden_layers: Optional[int] = opt(None, "override the preset's layer count")
    num_attention_heads: Optional[int] = opt(None, "override the preset's attention heads")
    num_key_value_heads: Optional[int] = opt(None, "override the preset's key/value heads (GQA)")
    doc_mask: bool = opt(True, "keep attention inside each document of a packed window (positions restart too)")
    attn_impl: Literal["auto", "sdpa", "flex"] = opt("auto", "attention kernel for --doc-mask: auto (FlexAttention "
                                                             "on CUDA, SDPA with a dense mask on CPU), sdpa (dense "
                                                             "mask) or flex (skips masked blocks; CUDA only)")
    zero_init_residual: bool = opt(True, "start o_proj and down_proj at zero (each block the identity); "
                                          "ignored with --init-from")
    init_from: Optional[str] = opt(None, "start from this RUNDIR or Hugging Face Llama directory (continued pretraining)")
    rope_scaling: Optional[Literal["linear", "dynamic", "yarn", "llama3"]] = opt(
        None, "with --init-from: extend the model's context to --seq-len by RoPE scaling (transformers' rope_type; "
              "yarn is the usual choice for a context-extension run)")
    rope_factor: Optional[float] = opt(None, "RoPE scaling factor (default: --seq-len / the original context)")


@dataclass
class EvalSection:
    eval_tokens: int = opt(131072, "validation tokens per evaluation")
    eval_batch_size: int = opt(16, "sequences per validation forward pass")
    prompts: list[str] = opt(DEFAULT_PROMPTS, "openings sampled at each evaluation")
    sample_tokens: int = opt(64, "tokens generated per opening at each evaluation")
    sample_temperature: float = opt(0.0, "temperature of those samples (0: greedy, comparable across evaluations)")


@dataclass
class PretrainTrainConfig(TrainConfig):
    # Pretraining's measured recipe (docs/RECIPE.md): Muon on the hidden matrices, warmup-stable-decay.
    optimizer: Literal["adamw", "muon"] = opt(
        "muon", "muon: Muon for the hidden matrices (attention, MLP), AdamW for embeddings/head/norms; or adamw"
    )
    schedule: Literal["cosine", "linear", "constant", "wsd"] = opt(
        "wsd", "decay after warmup: wsd (constant, then linear over decay_fraction), cosine, linear, or constant"
    )
    # Pretraining only: its steps hold exactly micro x accum x devices x seq_len tokens. The other verbs batch
    # conversations, pairs or samples of varying length and do not offer it.
    global_batch_tokens: Optional[int] = opt(
        None, "tokens per optimizer step across all devices; sets grad_accum_steps"
    )
    windows: Literal["random", "aligned"] = opt(
        "random", "training windows: random (the stream cut every seq_len tokens, in seeded order) or aligned "
                  "(every window starts at a document start, its tail filled by the next documents)"
    )


@dataclass
class PretrainConfig:
    """Pretrain a Llama-style model on token shards. Runs on CUDA, MPS or CPU; under torchrun (torchrun \
--nproc_per_node N -m xiaolm pretrain ...) it trains with DDP, or FSDP2 with --fsdp."""

    data: Optional[list[str]] = opt(None, "token shard directory (xiaolm data tokenize); several mix: --data a/ b/ c/, "
                              "weighted with --data-weights or as DIR:WEIGHT (all from one tokenizer)")
    data_weights: list[float] = opt([], "mixing weights of the --data directories (default: their token counts, "
                                        "which is plain concatenation)")
    tokenizer: Optional[str] = opt(None, "tokenizer directory (default: the one the shards name)")
    out: str = opt("runs/pretrain", "run directory: checkpoints, metrics.jsonl, config.yaml, loss_curve.png")
    model: ModelSection = field(default_factory=ModelSection)
    train: PretrainTrainConfig = field(default_factory=PretrainTrainConfig)
    eval: EvalSection = field(default_factory=EvalSection)
    distill: DistillSection = field(default_factory=DistillSection)
    lr_sweep: list[float] = opt([], "run short trials at these learning rates instead (see xiaolm sweep)")


# ----------------------------------------------------------------------------------------------- data


class WindowSampler:
    """Deterministic, resumable, rank-disjoint windows of ``seq_len + 1`` tokens from a token stream."""

    def __init__(self, shards, seq_len: int, seed: int, micro_batch: int, accum: int, env: DistEnv,
                 doc_mask: bool = False, eot_id: int = 0):
        self.shards, self.seq_len, self.seed = shards, seq_len, seed
        self.micro_batch, self.accum, self.env = micro_batch, accum, env
        self.mix = shards.windows(seq_len, seed) if hasattr(shards, "windows") else None  # MixedShards
        self.num_windows = self.mix.num_windows if self.mix else (shards.num_tokens - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(f"{shards.num_tokens} tokens are too few for one window of {seq_len + 1}")
        self.doc_mask, self.eot_id = doc_mask, eot_id
        self._epoch, self._perm = -1, None

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accum * self.env.world_size

    def window_id(self, g: int) -> int:
        epoch, pos = divmod(g, self.num_windows)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._epoch = epoch
        return int(self._perm[pos])

    def window_start(self, window: int) -> int:
        return window * self.seq_len

    def epochs_at(self, step: int) -> float:
        return step * self.global_batch / self.num_windows

    def _first(self, step: int, micro: int) -> int:
        return step * self.global_batch + (micro * self.env.world_size + self.env.rank) * self.micro_batch

    def window_ids(self, step: int, micro: int) -> list[int]:
        """The windows of this rank's micro-batch (offline teacher logits are read by them)."""
        first = self._first(step, micro)
        return [self.window_id(g) for g in range(first, first + self.micro_batch)]

    def __call__(self, step: int, micro: int) -> dict:
        first = self._first(step, micro)
        rows = np.stack([
            self.mix.read(g) if self.mix else self.shards.read(self.window_start(self.window_id(g)), self.seq_len + 1)
            for g in range(first, first + self.micro_batch)
        ])
        rows = torch.from_numpy(rows.astype(np.int64))
        batch = {"input_ids": rows[:, :-1], "targets": rows[:, 1:]}
        if self.doc_mask:
            from xiaolm.model.llama import doc_ids_from_tokens

            batch["doc_ids"] = doc_ids_from_tokens(batch["input_ids"], self.eot_id)
        return batch


def aligned_window_starts(doc_starts: np.ndarray, num_tokens: int, seq_len: int) -> np.ndarray:
    """Window starts that fall on document starts: each window of ``seq_len + 1`` tokens starts at a document,
    its tail is filled by the next documents, and the next window starts at the document the tail cut (so every
    document is also seen whole from its first token). Inside a document longer than a window, windows follow
    on back to back. nanochat's BOS-aligned packing is the model; this keeps the order of the stream."""
    starts, s, last = [], 0, num_tokens - seq_len - 1
    docs = np.asarray(doc_starts, dtype=np.int64)
    while s <= last:
        starts.append(s)
        # the latest document start inside (s, s + seq_len]: the one the window's end cut, or the next one
        i = int(np.searchsorted(docs, s + seq_len, side="right")) - 1
        s = int(docs[i]) if i >= 0 and docs[i] > s else s + seq_len
    return np.asarray(starts, dtype=np.int64)


class AlignedWindowSampler(WindowSampler):
    """``WindowSampler`` over document-aligned windows (``--train.windows aligned``): same order, resume and
    rank-disjointness guarantees, windows from :func:`aligned_window_starts`."""

    def __init__(self, shards, seq_len: int, *args, **kwargs):
        super().__init__(shards, seq_len, *args, **kwargs)
        self.starts = aligned_window_starts(shards.doc_starts, shards.num_tokens, seq_len)
        if len(self.starts) < 1:
            raise ValueError(f"{shards.num_tokens} tokens are too few for one window of {seq_len + 1}")
        self.num_windows = len(self.starts)

    def window_start(self, window: int) -> int:
        return int(self.starts[window])


def lm_loss(model, batch: dict, chunk: int = 0):
    """The loss summed over the batch's label tokens, and their number (the engine divides by the step's total)."""
    out = model(batch["input_ids"], targets=batch["targets"], doc_ids=batch.get("doc_ids"), loss_chunk_size=chunk)
    n = (batch["targets"] != -100).sum()
    return out.loss * n, n, {}


# ----------------------------------------------------------------------------------------------- eval


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats/token) of the token frequency distribution: the loss of a model that ignores context."""
    counts = np.bincount(tokens.astype(np.int64), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def sample_openings(model, tokenizer, prompts: list[str], max_new: int, temperature: float) -> list[str]:
    """Stories from ``prompts`` for the log and the report: whole characters, ended by the model or cut back to a
    sentence end and marked as cut."""
    from xiaolm.infer.generate import SamplingConfig
    from xiaolm.infer.stories import story_line, tell_stories

    if not prompts or max_new <= 0:
        return []
    was_training = model.training
    model.eval()
    stories = tell_stories(model, tokenizer, prompts,
                           SamplingConfig(max_new_tokens=max_new, temperature=temperature, seed=0))
    model.train(was_training)
    return [story_line(s, max_new) for s in stories]


# ----------------------------------------------------------------------------------------------- build


def _open_data(cfg: PretrainConfig):
    import json

    from xiaolm.data.shards import TokenShards, parse_data_dirs
    from xiaolm.tokenizer import load_tokenizer

    try:
        dirs, weights = parse_data_dirs(cfg.data, cfg.data_weights)
    except ValueError as exc:
        raise fail(str(exc)) from None
    for d in dirs:
        if not (Path(d) / "meta.json").is_file():
            raise fail(f"--data {d}: not a token shard directory (make one with xiaolm data tokenize)")
    if len(dirs) > 1:
        return _open_mixed(cfg, dirs, weights)
    data = Path(dirs[0])
    meta = json.loads((data / "meta.json").read_text(encoding="utf-8"))
    tok_dir = cfg.tokenizer or meta.get("tokenizer", {}).get("path")
    if not tok_dir:
        raise fail(f"--tokenizer is required: {data}/meta.json does not name the tokenizer")
    if not Path(tok_dir).is_dir():
        raise fail(f"--tokenizer {tok_dir}: no such directory")
    tokenizer = load_tokenizer(tok_dir)
    train = TokenShards(data, "train", expect_fingerprint=tokenizer.fingerprint)
    val = None
    if meta.get("splits", {}).get("val", {}).get("tokens", 0) > cfg.model.seq_len + 1:
        val = TokenShards(data, "val", expect_fingerprint=tokenizer.fingerprint)
    return tokenizer, train, val


def _open_mixed(cfg: PretrainConfig, dirs: list[str], weights):
    """Several shard directories: one MixedShards per split (val only where every directory has one)."""
    from xiaolm.data.shards import MixedShards, ShardMismatchError
    from xiaolm.tokenizer import load_tokenizer

    try:
        train = MixedShards(dirs, weights, "train")
    except ShardMismatchError as exc:
        raise fail(str(exc)) from None
    tok_dir = cfg.tokenizer or train.tokenizer_path
    if not tok_dir or not Path(tok_dir).is_dir():
        raise fail(f"--tokenizer {tok_dir}: no such directory" if tok_dir else
                   f"--tokenizer is required: {dirs[0]}/meta.json does not name the tokenizer")
    tokenizer = load_tokenizer(tok_dir)
    try:
        train.parts[0].check_tokenizer(tokenizer)
    except ShardMismatchError as exc:
        raise fail(str(exc)) from None
    val = None
    if all(p.meta.get("splits", {}).get("val", {}).get("tokens", 0) > cfg.model.seq_len + 1 for p in train.parts):
        val = MixedShards(dirs, weights, "val")
    log("data mix: " + ", ".join(f"{p.shard_dir} {w:.1%} ({human(p.num_tokens)} tokens)"
                                 for p, w in zip(train.parts, train.weights)))
    return tokenizer, train, val


def _head(shards, n: int) -> np.ndarray:
    """The first ``n`` tokens of one directory; a mix's are taken from every directory by weight."""
    return shards.head(n) if hasattr(shards, "head") else shards.read(0, n)


def build_model(cfg: PretrainConfig, vocab_size: int, tokenizer):
    from xiaolm.model.llama import Llama, preset_config

    m = cfg.model
    if m.init_from:
        from xiaolm.model.io import load_model

        model, init_tok, _ = load_model(m.init_from, device="cpu", dtype=torch.float32)
        if init_tok is not None and init_tok.fingerprint != tokenizer.fingerprint:
            raise fail(f"--init-from {m.init_from} uses tokenizer {init_tok.fingerprint}, the shards use "
                       f"{tokenizer.fingerprint}: tokenise the data with the model's tokenizer")
        if m.rope_scaling:
            from xiaolm.model.rope import extend_context

            try:
                scaling = extend_context(model, m.seq_len, m.rope_scaling, m.rope_factor)
            except ValueError as exc:
                raise fail(str(exc)) from None
            log(f"context {scaling['original_max_position_embeddings']} -> {model.config.max_position_embeddings} "
                f"tokens: RoPE scaling {scaling['rope_type']}, factor {scaling['factor']:g}")
        elif model.config.max_position_embeddings < m.seq_len:
            model.config.max_position_embeddings = m.seq_len
        return model
    if m.rope_scaling or m.rope_factor:
        raise fail("--rope-scaling extends a pretrained model's context: use it with --init-from RUN")
    overrides = {k: getattr(m, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                             "num_attention_heads", "num_key_value_heads") if getattr(m, k)}
    mcfg = preset_config(
        m.preset, vocab_size=vocab_size, max_position_embeddings=m.seq_len, rope_theta=m.rope_theta,
        tie_word_embeddings=m.tie_word_embeddings, bos_token_id=tokenizer.eot_id, eos_token_id=tokenizer.eot_id,
        pad_token_id=tokenizer.pad_id, **overrides,
    )
    model = Llama(mcfg)
    if m.zero_init_residual:
        model.zero_init_residual_()
    return model


def _distiller(cfg: PretrainConfig, tokenizer, vocab_size: int, env: DistEnv, aligned: bool):
    """The run's ``Distiller`` (--teacher / --teacher-logits), or None without a teacher."""
    d = cfg.distill
    if not d.enabled:
        return None
    from xiaolm.data.shards import parse_data_dirs
    from xiaolm.train.distill import Distiller

    dirs, _ = parse_data_dirs(cfg.data, cfg.data_weights)
    if d.teacher_logits and (len(dirs) > 1 or aligned):
        raise fail("--teacher-logits follows the windows of one shard directory read with --windows random; "
                   "with several --data directories or --windows aligned distil online (--teacher)")
    return Distiller(d, tokenizer, vocab_size, env.device, shard_dir=dirs[0], seq_len=cfg.model.seq_len,
                     doc_mask=cfg.model.doc_mask)


def pretrain(cfg: PretrainConfig, env: Optional[DistEnv] = None) -> dict:
    """Run pretraining as configured; returns the run's summary (also written to RUNDIR/summary.json)."""
    from xiaolm.model.llama import count_parameters, flops_per_token

    if cfg.lr_sweep:
        from xiaolm.train.sweep import sweep

        return sweep(cfg, pretrain)
    if not cfg.data:
        raise fail("--data SHARDDIR is required")
    env = env or setup_distributed(cfg.train.device)
    seed_everything(cfg.train.seed)
    tokenizer, train_shards, val_shards = _open_data(cfg)
    model = build_model(cfg, tokenizer.vocab_size, tokenizer)
    if cfg.model.attn_impl == "flex" and not env.device.startswith("cuda"):
        raise fail("--attn-impl flex trains on CUDA only (FlexAttention has no backward pass on CPU); use sdpa")
    model.attn_impl = cfg.model.attn_impl
    mcfg = model.config
    t = cfg.train
    seq = cfg.model.seq_len
    if t.global_batch_tokens:
        per_micro = t.micro_batch_size * seq * env.world_size
        t.grad_accum_steps = max(1, round(t.global_batch_tokens / per_micro))
    tokens_per_step = t.micro_batch_size * t.grad_accum_steps * env.world_size * seq
    total_steps = resolve_steps(t, tokens_per_step, default_steps=None if t.max_tokens or t.max_steps else
                                max(1, train_shards.num_tokens // tokens_per_step))
    aligned = t.windows == "aligned"
    if aligned and hasattr(train_shards, "windows"):  # MixedShards draws its own windows per directory
        raise fail("--windows aligned reads one shard directory; with several --data directories use --windows random")
    sampler = (AlignedWindowSampler if aligned else WindowSampler)(train_shards, seq, t.seed, t.micro_batch_size,
                                                                   t.grad_accum_steps, env,
                                                                   doc_mask=cfg.model.doc_mask, eot_id=tokenizer.eot_id)
    eval_source = val_shards if val_shards is not None else train_shards
    if val_shards is None:
        log("warning: the shards have no 'val' split; validation uses the start of the training data")
    n_eval = min(cfg.eval.eval_tokens + 1, eval_source.num_tokens)
    evaluator = StreamEvaluator(_head(eval_source, n_eval), tokenizer, seq, cfg.eval.eval_batch_size,
                                cfg.model.doc_mask)
    sample_n = min(train_shards.num_tokens, 2_000_000)
    h_unigram = unigram_entropy(_head(train_shards, sample_n), mcfg.vocab_size)
    n = count_parameters(mcfg)
    fpt = flops_per_token(mcfg, seq)

    def eval_fn(m, step):
        result = evaluator(m)
        result["samples"] = sample_openings(m, tokenizer, cfg.eval.prompts, cfg.eval.sample_tokens,
                                            cfg.eval.sample_temperature)
        return result

    out = Path(cfg.out)
    distiller = _distiller(cfg, tokenizer, mcfg.vocab_size, env, aligned)
    trainer = Trainer(
        t, model, out, total_steps=total_steps, dist_env=env, full_config=cfg,
        tokenizer=tokenizer, flops_per_token=fpt, name="pretrain",
        extra_meta={"unigram_entropy": h_unigram, "params": n["total"], "seq_len": seq,
                    **({"distill": distiller.describe()} if distiller is not None else {})},
        new_run_hint=f"start a new run with another --out (--init-from {out} starts one from these weights)",
        oom_fallback=True,  # token-summed LM loss: halving the micro-batch leaves the loss curve as it is
    )
    trainer.open_run_dir()  # a resume that does not fit is refused before anything in OUT is written
    if env.is_main:
        log(f"model {cfg.model.preset if not cfg.model.init_from else cfg.model.init_from}: "
            f"{n['total'] / 1e6:.2f}M parameters ({n['body'] / 1e6:.2f}M without embeddings), "
            f"vocab {mcfg.vocab_size}, context {seq}")
        log(f"data: {human(train_shards.num_tokens)} training tokens, {human(tokens_per_step)} tokens/step "
            f"({t.micro_batch_size} x {t.grad_accum_steps} accum x {env.world_size} proc x {seq}), "
            f"{total_steps} steps = {sampler.epochs_at(total_steps):.2f} epochs; device {env.device}")
    chunk = t.loss_chunk_size
    if distiller is not None:
        result = trainer.fit(distiller.wrap_windows(sampler), distiller.loss_fn(chunk), eval_fn)
    else:
        result = trainer.fit(sampler, lambda m, b: lm_loss(m, b, chunk), eval_fn)
    summary = {
        "run": str(out), **result.summary(total_steps),
        "params": n["total"], "params_body": n["body"], "preset": cfg.model.preset,
        "unigram_entropy": h_unigram, "epochs": round(sampler.epochs_at(result.step), 3),
        "device": env.device, "world_size": env.world_size,
        **{k: v for k, v in result.last_eval.items() if k.startswith("val_") or k == "chars_per_token"},
        "samples": result.last_eval.get("samples", []),
        **(distiller.summary(result.elapsed) if distiller is not None else {}),
    }
    if env.is_main:
        from xiaolm.train.report import write_report
        from xiaolm.utils import atomic_write_json

        atomic_write_json(out / "summary.json", summary)
        write_report(out, summary, cfg)
    return summary


def main(argv: list[str]) -> int:
    cfg, _ = parse_config(PretrainConfig, argv, "xiaolm pretrain")
    summary, env = run_training(pretrain, cfg)
    if env.is_main and not cfg.lr_sweep:
        from xiaolm.train.report import print_summary

        print_summary(summary, file=sys.stdout)
    return int(summary.get("exit_code", 0))


def sweep_main(argv: list[str]) -> int:
    """``xiaolm sweep``."""
    from xiaolm.train.sweep import sweep

    cfg, _ = parse_config(
        PretrainConfig, argv, "xiaolm sweep",
        "Short pretraining trials at several learning rates (--lr-sweep 1e-4,3e-4,1e-3); prints and plots the "
        "loss per rate and names the best. Takes every xiaolm pretrain option.",
    )
    if not cfg.lr_sweep:
        cfg.lr_sweep = [1e-4, 3e-4, 1e-3, 3e-3]
    sweep(cfg, pretrain)
    return 0
