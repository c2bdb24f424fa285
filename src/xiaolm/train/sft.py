"""``xiaolm sft``: supervised fine-tuning on chat data, full or LoRA, on the shared training engine.

Data. Conversations come from our instruction data (``xiaolm data instruct`` DIR: its ``train.jsonl``, and its
``heldout.jsonl`` for the held-out loss) or from Alpaca / ShareGPT / OpenAI-messages files (``xiaolm.data.formats``;
malformed samples are reported with file and line and skipped). Each conversation is rendered with the tokenizer's
chat template (ChatML: ``<|im_start|>{role}\\n{content}<|im_end|>\\n``) and encoded piece by piece, so that the
prompt part is token for token what ``apply_chat_template(..., add_generation_prompt=True)`` gives at inference.

Loss mask. Only assistant tokens carry labels: the content of every assistant turn and its closing ``<|im_end|>``
(the model must learn to stop). System and user turns, the ``<|im_start|>assistant\\n`` headers and the newline
between turns are context only.

Length rule. A conversation longer than the context (``seq_len + 1`` tokens, since inputs and targets are shifted by
one) is, with ``--overlong truncate`` (the default), cut to its first ``seq_len + 1`` tokens: later turns are lost,
never earlier ones; if nothing with a label is left it is dropped. With ``--overlong drop`` it is dropped. Both are
counted and reported.

Batching. ``--packing`` (the default) packs whole conversations, in a seeded order that changes every epoch, into rows
of ``seq_len`` tokens; the model's ``doc_ids`` keeps attention inside each conversation and restarts positions, so a
packed row computes exactly what the conversations would alone. ``--no-packing`` pads each micro-batch to its
longest conversation (right padding, which causal attention never looks at). Either way, units of similar length
share a micro-batch (``--group-by-length``, within windows of 16 micro-batches whose order is then shuffled), and the
share of padding tokens is reported.

Training uses ``xiaolm.train.engine.Trainer``: checkpoints (atomic, sha256-verified), ``--resume``, Ctrl-C/SIGTERM,
NaN guard, metrics.jsonl, loss curve, and a held-out SFT loss (``val_loss``, the mean loss per assistant token) at
each evaluation. ``--lora`` trains peft LoRA adapters only (``xiaolm.train.lora``); ``--merge`` also writes the
merged plain model to ``OUT/merged``. OUT is a RUNDIR that ``load_model`` (and every later verb) reads.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

from xiaolm.config import opt, parse_config
from xiaolm.tokenizer.chat import SegmentEncoder, conversation_segments, uses_markers
from xiaolm.train.dist import DistEnv, setup_distributed
from xiaolm.train.distill import DistillSection
from xiaolm.train.engine import TrainConfig, Trainer, run_training
from xiaolm.train.schedule import resolve_steps
from xiaolm.utils import fail, human, log, seed_everything, stable_hash


@dataclass
class SFTConfig:
    """Supervised fine-tuning on chat data (ChatML, loss on assistant tokens only), full or LoRA.
    examples:
      xiaolm data instruct stories.jsonl --out data/instruct
      xiaolm sft runs/pretrain --data data/instruct --out runs/sft
      xiaolm sft runs/pretrain --data alpaca.json sharegpt.jsonl --lora --merge --out runs/sft-lora
    """

    run: str = opt(None, "the model to fine-tune: a RUNDIR (xiaolm pretrain), checkpoint or Hugging Face Llama dir")
    data: list[str] = opt([], "instruction data: a `xiaolm data instruct` DIR, or Alpaca / ShareGPT / OpenAI "
                              "messages files (JSON or JSON Lines), or directories of them")
    out: str = opt("runs/sft", "output RUNDIR: checkpoints, metrics.jsonl, config.yaml, report.md")
    format: Literal["auto", "alpaca", "sharegpt", "openai"] = opt("auto", "layout of --data files (auto: per record)")
    heldout: list[str] = opt([], "held-out files for the SFT validation loss (default: the instruct DIR's "
                                 "heldout.jsonl, else a hash split of --data)")
    heldout_fraction: float = opt(0.02, "share of conversations held out when no held-out file is given")
    checkpoint: str = opt("latest", "which checkpoint of RUNDIR to start from: latest or best")
    seq_len: Optional[int] = opt(None, "context length for training (default: the model's)")
    overlong: Literal["truncate", "drop"] = opt("truncate", "conversations longer than the context: keep their first "
                                                            "seq_len+1 tokens, or drop them (counted either way)")
    packing: bool = opt(True, "pack conversations into full rows with attention kept inside each (else pad to the "
                              "batch's longest)")
    group_by_length: bool = opt(True, "batch conversations (or packed rows) of similar length together: less padding")
    epochs: float = opt(3.0, "passes over the training data (when --max-steps / --max-tokens are not given)")
    lora: bool = opt(False, "train LoRA adapters (peft) instead of all weights")
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: float = opt(32.0, "LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = opt(0.05, "dropout on the LoRA input")
    lora_targets: list[str] = opt(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                  "linear layers that get adapters")
    merge: bool = opt(False, "with --lora: also write the merged plain model to OUT/merged at the end")
    eval_conversations: int = opt(256, "held-out conversations in each validation loss")
    eval_batch_size: int = opt(16, "conversations per validation forward pass")
    sample_prompts: int = opt(2, "held-out prompts answered (greedy) at each evaluation, shown in the log")
    sample_tokens: int = opt(64, "tokens generated for each of those answers")
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillSection = field(default_factory=DistillSection)


# ---------------------------------------------------------------------------------------------- encoding


@dataclass
class Example:
    """One conversation ready for training: ``inputs[t]`` predicts ``targets[t]`` (-100: no loss there)."""

    inputs: np.ndarray  # int64 [n]
    targets: np.ndarray  # int64 [n]

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def label_count(self) -> int:
        return int((self.targets != -100).sum())


def to_example(ids: list[int], mask: list[bool]) -> Example:
    arr = np.asarray(ids, dtype=np.int64)
    lab = np.asarray(mask, dtype=bool)
    targets = np.where(lab[1:], arr[1:], -100)
    return Example(arr[:-1].copy(), targets)


@dataclass
class EncodeStats:
    conversations: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    tokens: int = 0
    label_tokens: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def encode_all(tokenizer, conversations: list[list[dict]], seq_len: int, overlong: str = "truncate",
               tools: Optional[list[Optional[list]]] = None) -> tuple[list[Example], EncodeStats]:
    """Encode conversations (``tools[i]``: the schemas conversation ``i`` offers; literal texts in one fast batch)
    and apply the length rule (module docstring)."""
    stats = EncodeStats(conversations=len(conversations))
    tools = tools or [None] * len(conversations)
    segments = [conversation_segments(msgs, t) for msgs, t in zip(conversations, tools)]
    examples = []
    for ids, mask in SegmentEncoder(tokenizer).encode_many(segments):
        if len(ids) - 1 > seq_len:
            if overlong == "drop":
                stats.dropped_overlong += 1
                continue
            ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
            if not any(mask[1:]):
                stats.dropped_overlong += 1
                continue
            stats.truncated += 1
        ex = to_example(ids, mask)
        examples.append(ex)
        stats.kept += 1
        stats.tokens += len(ex)
        stats.label_tokens += ex.label_count
    return examples, stats


def add_chat_markers(model, tokenizer) -> Optional[str]:
    """Give an older tokenizer the thinking / tool markers and the model embedding rows for them, initialised to the
    mean of the trained rows (a neutral start: every logit of a new token starts at the average). Returns the one
    line to print, or None when nothing was needed."""
    if tokenizer.has_markers:
        return None
    old = tokenizer.vocab_size
    added = tokenizer.add_markers()
    new = tokenizer.vocab_size
    embed = model.model.embed_tokens
    rows = embed.weight.shape[0]
    with torch.no_grad():
        if rows < new:
            grown = torch.nn.Embedding(new, embed.weight.shape[1], dtype=embed.weight.dtype, device=embed.weight.device)
            grown.weight[:rows] = embed.weight
            model.model.embed_tokens = grown
            if not model.config.tie_word_embeddings:
                head = torch.nn.Linear(model.lm_head.in_features, new, bias=False, dtype=model.lm_head.weight.dtype,
                                       device=model.lm_head.weight.device)
                head.weight[:rows] = model.lm_head.weight
                model.lm_head = head
            model.config.vocab_size = new
            model.tie_weights()
        model.model.embed_tokens.weight[old:new] = model.model.embed_tokens.weight[:old].mean(0)
        if not model.config.tie_word_embeddings:
            model.lm_head.weight[old:new] = model.lm_head.weight[:old].mean(0)
    return (f"sft: the data uses thinking / tool markers the tokenizer lacks; added {added} special tokens (ids "
            f"{old}..{new - 1}) and embedding rows for them (the mean of the trained rows)")


# ---------------------------------------------------------------------------------------------- batching


PACK_OPEN_ROWS = 64  # how many unfinished rows first-fit packing looks back over


def pack_rows(lengths: list[int], order: np.ndarray, seq_len: int) -> list[list[int]]:
    """First-fit packing in the given order: each conversation goes into the first of the last ``PACK_OPEN_ROWS``
    unfinished rows with room for it, else starts a new row. (Going to the next row only, when conversations are
    most of a row long, leaves a row per conversation; looking back a little fills the gaps.)"""
    rows: list[list[int]] = []
    room: list[int] = []  # free tokens of each row
    first_open = 0
    for i in order.tolist():
        n = lengths[i]
        for r in range(first_open, len(rows)):
            if room[r] >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(seq_len - n)
            first_open = max(first_open, len(rows) - PACK_OPEN_ROWS)
    return rows


class SFTBatches:
    """``batch_fn(step, micro)`` for the Trainer: a pure function of (step, micro, rank), so resume is exact.

    A *unit* is a packed row (packing) or one conversation (padding). Each epoch visits the units of a seeded
    permutation of the conversations; step ``s`` takes the next ``global batch`` units, rank ``r`` its own slice,
    and a micro-batch is padded to its longest unit, rounded up to a multiple of seq_len / 8 (few shapes).
    """

    def __init__(self, examples: list[Example], seq_len: int, micro_batch: int, accum: int, env: DistEnv,
                 seed: int, packing: bool, pad_id: int, group_by_length: bool = True):
        if not examples:
            raise ValueError("no training conversations left after encoding")
        self.examples, self.seq_len = examples, seq_len
        self.micro_batch, self.accum, self.env = micro_batch, accum, env
        self.seed, self.packing, self.pad_id = seed, packing, pad_id
        self.group_by_length = group_by_length
        self.lengths = [len(e) for e in examples]
        self._layouts: dict[int, list[list[int]]] = {}
        self._starts = [0]  # first global unit index of each epoch computed so far

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accum * self.env.world_size

    def layout(self, epoch: int) -> list[list[int]]:
        if epoch not in self._layouts:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.examples))
            units = pack_rows(self.lengths, order, self.seq_len) if self.packing else [[int(i)] for i in order]
            if self.group_by_length:
                units = self._group(units, rng)
            if len(self._layouts) > 3:
                self._layouts.pop(min(self._layouts))
            self._layouts[epoch] = units
        return self._layouts[epoch]

    def _group(self, units: list[list[int]], rng: np.random.Generator, window_batches: int = 16) -> list[list[int]]:
        """Within windows of ``window_batches`` micro-batches, put units of similar length in the same micro-batch
        (less padding), then shuffle the micro-batches of the window (no long-to-short order within an epoch)."""
        size = lambda u: sum(self.lengths[i] for i in u)  # noqa: E731
        out: list[list[int]] = []
        step = self.micro_batch * window_batches
        for start in range(0, len(units), step):
            window = sorted(units[start : start + step], key=size)
            chunks = [window[i : i + self.micro_batch] for i in range(0, len(window), self.micro_batch)]
            for k in rng.permutation(len(chunks)).tolist():
                out.extend(chunks[k])
        return out

    def _locate(self, g: int) -> tuple[int, int]:
        """Global unit index -> (epoch, position in that epoch)."""
        while self._starts[-1] <= g:
            e = len(self._starts) - 1
            self._starts.append(self._starts[-1] + len(self.layout(e)))
        epoch = int(np.searchsorted(self._starts, g, side="right")) - 1
        return epoch, g - self._starts[epoch]

    @property
    def units_per_epoch(self) -> int:
        return len(self.layout(0))

    def epochs_at(self, step: int) -> float:
        return step * self.global_batch / self.units_per_epoch

    def width(self, longest: int) -> int:
        """The padded width of a micro-batch whose longest unit has ``longest`` tokens: rounded up to a multiple of
        seq_len / 8, so a compiled model meets at most 8 shapes instead of one per distinct length."""
        step = max(1, -(-self.seq_len // 8))
        return min(self.seq_len, -(-longest // step) * step) if longest <= self.seq_len else longest

    def collate(self, units: list[list[int]]) -> dict:
        lengths = [sum(self.lengths[i] for i in u) for u in units]
        width = self.width(max(lengths))
        B = len(units)
        inputs = np.full((B, width), self.pad_id, dtype=np.int64)
        targets = np.full((B, width), -100, dtype=np.int64)
        doc_ids = np.zeros((B, width), dtype=np.int64)
        for r, unit in enumerate(units):
            pos = 0
            for d, i in enumerate(unit):
                ex = self.examples[i]
                n = len(ex)
                inputs[r, pos : pos + n] = ex.inputs
                targets[r, pos : pos + n] = ex.targets
                doc_ids[r, pos : pos + n] = d
                pos += n
            doc_ids[r, pos:] = len(unit)  # the padding tail is a document of its own
        batch = {"input_ids": torch.from_numpy(inputs), "targets": torch.from_numpy(targets),
                 "num_tokens": int(sum(lengths))}
        if self.packing:
            batch["doc_ids"] = torch.from_numpy(doc_ids)
        return batch

    def units_for(self, step: int, micro: int) -> list[list[int]]:
        first = step * self.global_batch + (micro * self.env.world_size + self.env.rank) * self.micro_batch
        out = []
        for g in range(first, first + self.micro_batch):
            epoch, pos = self._locate(g)
            out.append(self.layout(epoch)[pos])
        return out

    def __call__(self, step: int, micro: int) -> dict:
        return self.collate(self.units_for(step, micro))

    def padding_share(self) -> float:
        """Share of padding tokens over one epoch's micro-batches (as the run will see them)."""
        units = self.layout(0)
        real = padded = 0
        for i in range(0, len(units), self.micro_batch):
            chunk = units[i : i + self.micro_batch]
            lens = [sum(self.lengths[j] for j in u) for u in chunk]
            real += sum(lens)
            padded += self.width(max(lens)) * self.micro_batch
        return 1.0 - real / max(1, padded)


def sft_loss(model, batch: dict, chunk: int = 0):
    """The loss summed over the batch's assistant tokens, and their number: the engine divides by the step's total,
    so every assistant token weighs the same however the conversations fall into micro-batches."""
    out = model(batch["input_ids"], targets=batch["targets"], doc_ids=batch.get("doc_ids"), loss_chunk_size=chunk)
    n = (batch["targets"] != -100).sum()
    return out.loss * n, n, {}


# ---------------------------------------------------------------------------------------------- evaluation


class HeldoutLoss:
    """Mean loss per assistant token over held-out conversations (each alone, right-padded in batches)."""

    def __init__(self, examples: list[Example], batch_size: int, pad_id: int):
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.label_tokens = sum(e.label_count for e in examples)

    @torch.no_grad()
    def __call__(self, model) -> dict:
        device = model.device
        total = torch.zeros((), dtype=torch.float64, device=device)
        for i in range(0, len(self.examples), self.batch_size):
            chunk = self.examples[i : i + self.batch_size]
            width = max(len(e) for e in chunk)
            x = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            y = torch.full((len(chunk), width), -100, dtype=torch.long)
            for r, e in enumerate(chunk):
                x[r, : len(e)] = torch.from_numpy(e.inputs)
                y[r, : len(e)] = torch.from_numpy(e.targets)
            logits = model(x.to(device)).logits
            total += torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=-100, reduction="sum"
            ).double()
        loss = float(total) / max(1, self.label_tokens)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "val_label_tokens": self.label_tokens}


def answer_prompts(model, tokenizer, prompts: list[list[dict]], max_new: int,
                   tools: Optional[list[Optional[list]]] = None) -> list[str]:
    """Greedy answers to chat prompts (for the log); ``tools[i]``: the schemas prompt ``i`` offers."""
    from xiaolm.infer.generate import SamplingConfig, generate
    from xiaolm.tokenizer.chat import prompt_ids

    if not prompts or max_new <= 0:
        return []
    ids = [prompt_ids(tokenizer, p, t) for p, t in zip(prompts, tools or [None] * len(prompts))]
    was_training = model.training
    model.eval()
    texts = generate(model, tokenizer, [""] * len(ids), SamplingConfig(max_new_tokens=max_new, temperature=0.0),
                     prompt_ids=ids)
    model.train(was_training)
    return [f"{p[-1]['content'][:40]!r} -> {t[:120]!r}" for p, t in zip(prompts, texts)]


# ---------------------------------------------------------------------------------------------- data loading


def _is_instruct_dir(path: Path) -> bool:
    return path.is_dir() and (path / "train.jsonl").is_file()


def load_sft_data(cfg: SFTConfig):
    """(train conversations, held-out conversations, per-file reports, how the held-out set was chosen)."""
    from xiaolm.data.formats import expand_paths, load_conversations

    if not cfg.data:
        raise fail("--data is required: an instruct DIR or Alpaca / ShareGPT / OpenAI files")
    try:
        train_files = expand_paths(cfg.data, "train")
        heldout_files = [Path(p) for p in cfg.heldout]
        for p in heldout_files:
            if not p.is_file():
                raise FileNotFoundError(f"{p}: no such file")
    except FileNotFoundError as exc:
        raise fail(str(exc))
    if not heldout_files:
        heldout_files = [Path(p) / "heldout.jsonl" for p in cfg.data
                         if _is_instruct_dir(Path(p)) and (Path(p) / "heldout.jsonl").is_file()]
    train, reports = load_conversations(train_files, cfg.format)
    if heldout_files:
        heldout, more = load_conversations(heldout_files, cfg.format)
        reports += more
        how = "files: " + ", ".join(str(p) for p in heldout_files)
    else:
        # Hash split by content: the same conversation is always on the same side.
        cut = round(cfg.heldout_fraction * 10_000)
        keyed = [(stable_hash(repr(c.messages)) % 10_000 < cut, c) for c in train]
        heldout = [c for h, c in keyed if h]
        train = [c for h, c in keyed if not h]
        how = f"hash split, {cfg.heldout_fraction:.1%} of --data"
    return train, heldout, reports, how


# ---------------------------------------------------------------------------------------------- main


BAD_RECORDS_FILE = "bad_records.txt"


def _list_bad_records(reports, path: Path) -> None:
    """The console shows the first few problems of each file; the full list goes to ``path``."""
    from xiaolm.utils import atomic_write_text

    problems = [str(p) for r in reports for p in r.problems]
    if not problems:
        return
    atomic_write_text(path, "\n".join(problems) + "\n")
    skipped = sum(r.skipped for r in reports)
    trimmed = f" ({len(problems) - skipped} more trimmed)" if len(problems) > skipped else ""
    log(f"{skipped} malformed record(s) skipped in all{trimmed}; the full list is in {path}")


def sft(cfg: SFTConfig, env: Optional[DistEnv] = None) -> dict:
    """Run SFT as configured; returns the summary (also written to OUT/summary.json)."""
    from xiaolm.model.io import CheckpointError, load_model

    if not cfg.run:
        raise fail("give the model to fine-tune: xiaolm sft RUNDIR --data ... --out SFTDIR")
    if cfg.merge and not cfg.lora:
        raise fail("--merge applies to --lora runs (a full fine-tune is already a plain model)")
    env = env or setup_distributed(cfg.train.device)
    seed_everything(cfg.train.seed)
    train_convs, heldout_convs, reports, heldout_how = load_sft_data(cfg)
    for r in reports:
        log(r.summary())
    try:
        model, tokenizer, info = load_model(cfg.run, device="cpu", dtype=torch.float32, which=cfg.checkpoint)
    except CheckpointError as exc:
        raise fail(str(exc))
    if getattr(tokenizer, "im_end_id", None) is None:
        raise fail(f"{cfg.run}: the tokenizer has no chat markers (<|im_start|>, <|im_end|>)")
    context = model.config.max_position_embeddings
    seq = cfg.seq_len or context
    if seq > context:
        raise fail(f"--seq-len {seq} exceeds the model's context ({context} positions)")
    if any(uses_markers(c.messages, c.tools) for c in train_convs):
        note = add_chat_markers(model, tokenizer)
        if note:
            log(note)
    train_examples, train_stats = encode_all(tokenizer, [c.messages for c in train_convs], seq, cfg.overlong,
                                             [c.tools for c in train_convs])
    held = heldout_convs[: cfg.eval_conversations]
    heldout_examples, heldout_stats = encode_all(tokenizer, [c.messages for c in held], seq, cfg.overlong,
                                                 [c.tools for c in held])
    if not train_examples:
        raise fail("no training conversations (see the messages above)")
    t = cfg.train
    batches = SFTBatches(train_examples, seq, t.micro_batch_size, t.grad_accum_steps, env, t.seed, cfg.packing,
                         tokenizer.pad_id, cfg.group_by_length)
    pad_share = batches.padding_share()
    default_steps = max(1, math.ceil(cfg.epochs * batches.units_per_epoch / batches.global_batch))
    tokens_per_step = batches.global_batch * (seq if cfg.packing else int(np.mean(batches.lengths)))
    total_steps = resolve_steps(t, tokens_per_step, default_steps=None if t.max_steps or t.max_tokens else default_steps)

    lora_info = None
    param_groups = None
    trainer_cls = Trainer
    if cfg.lora:
        from xiaolm.train.lora import LoraTrainer, apply_lora, trainable_parameters

        model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                           target_modules=cfg.lora_targets, base_name=str(cfg.run))
        trainable = trainable_parameters(model)
        param_groups = [{"params": trainable, "weight_decay": t.weight_decay}]
        trainer_cls = LoraTrainer
        lora_info = {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                     "targets": list(cfg.lora_targets), "trainable_params": sum(p.numel() for p in trainable)}
    base_model = model.get_base_model() if cfg.lora else model
    n_params = sum(p.numel() for name, p in base_model.named_parameters() if ".lora_" not in name)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    evaluator = HeldoutLoss(heldout_examples, cfg.eval_batch_size, tokenizer.pad_id) if heldout_examples else None
    sample_prompts = [c.prompt_messages for c in heldout_convs[: cfg.sample_prompts]]
    sample_tools = [c.tools for c in heldout_convs[: cfg.sample_prompts]]

    def eval_fn(m, step):
        result = evaluator(m) if evaluator is not None else {}
        result["samples"] = answer_prompts(m, tokenizer, sample_prompts, cfg.sample_tokens, sample_tools)
        return result

    out = Path(cfg.out)
    distiller = None
    if cfg.distill.teacher_logits:
        raise fail("--teacher-logits: offline logits follow pretraining windows; SFT distils online (--teacher)")
    if cfg.distill.enabled:
        from xiaolm.train.distill import Distiller

        distiller = Distiller(cfg.distill, tokenizer, base_model.config.vocab_size, env.device)
    data_report = {
        "train": train_stats.to_dict(), "heldout": heldout_stats.to_dict(), "heldout_source": heldout_how,
        "packing": cfg.packing, "padding_share": round(pad_share, 4), "seq_len": seq,
        "overlong_rule": cfg.overlong, "files": [r.to_dict() for r in reports],
    }
    trainer = trainer_cls(
        t, model, out, total_steps=total_steps, dist_env=env, full_config=cfg,
        model_config=base_model.config.to_dict(), tokenizer=tokenizer, param_groups=param_groups, name="sft",
        extra_meta={"base": str(cfg.run), "lora": lora_info,
                    **({"distill": distiller.describe()} if distiller is not None else {})}, oom_fallback=True,
    )
    trainer.open_run_dir()  # a resume that does not fit is refused before anything in OUT is written
    if env.is_main:
        _list_bad_records(reports, out / BAD_RECORDS_FILE)
        log(f"base model {cfg.run} ({info.kind}): {n_params / 1e6:.2f}M parameters, {n_trainable / 1e6:.3f}M trainable"
            + (f" (LoRA r={cfg.lora_r}, alpha={cfg.lora_alpha}, on {','.join(cfg.lora_targets)})" if cfg.lora else ""))
        log(f"data: {train_stats.kept} training conversations ({train_stats.truncated} truncated, "
            f"{train_stats.dropped_overlong} dropped as longer than {seq + 1} tokens), {heldout_stats.kept} held-out "
            f"({heldout_how}); {human(train_stats.label_tokens)} of {human(train_stats.tokens)} tokens carry labels")
        log(f"batching: {'packed' if cfg.packing else 'padded'}, {batches.units_per_epoch} "
            f"{'rows' if cfg.packing else 'conversations'} per epoch, padding {100 * pad_share:.1f}% of tokens; "
            f"{total_steps} steps = {batches.epochs_at(total_steps):.2f} epochs; device {env.device}")
    chunk = t.loss_chunk_size
    loss_fn = distiller.loss_fn(chunk) if distiller is not None else (lambda m, b: sft_loss(m, b, chunk))
    result = trainer.fit(batches, loss_fn, eval_fn)
    summary = {
        "run": str(out), "base": str(cfg.run), **result.summary(total_steps),
        "params": n_params, "trainable_params": n_trainable, "lora": lora_info,
        "epochs": round(batches.epochs_at(result.step), 3), "device": env.device, "world_size": env.world_size,
        "data": data_report,
        **{k: v for k, v in result.last_eval.items() if k.startswith("val_")},
        "samples": result.last_eval.get("samples", []),
        **(distiller.summary(result.elapsed) if distiller is not None else {}),
    }
    if cfg.merge and env.is_main and not result.interrupted:
        from xiaolm.model.lora import merge_lora
        from xiaolm.train.lora import save_merged

        merged = merge_lora(trainer.raw_model.to("cpu"))
        meta = {"kind": "sft-merged", "base": str(cfg.run), "lora": lora_info, "step": result.step,
                "tokenizer_fingerprint": tokenizer.fingerprint}
        summary["merged"] = str(save_merged(merged, out / "merged", meta, tokenizer))
    if env.is_main:
        from xiaolm.utils import atomic_write_json

        atomic_write_json(out / "summary.json", summary)
        _write_sft_report(out, summary, cfg)
    return summary


def _write_sft_report(out: Path, summary: dict, cfg: SFTConfig) -> None:
    from xiaolm.train.report import write_report
    from xiaolm.utils import atomic_write_text

    path = write_report(out, {**summary, "val_loss": summary.get("val_loss")}, cfg, title="xiaolm SFT report")
    d = summary["data"]
    lines = [
        "", "## Fine-tuning data", "",
        "| measure | value |", "|---|---|",
        f"| base model | `{summary['base']}` |",
        f"| method | {'LoRA r=%d alpha=%g' % (cfg.lora_r, cfg.lora_alpha) if cfg.lora else 'full fine-tuning'} |",
        f"| trainable parameters | {summary['trainable_params']:,} |",
        f"| training conversations | {d['train']['kept']:,} |",
        f"| truncated / dropped (longer than {d['seq_len'] + 1} tokens, rule: {d['overlong_rule']}) | "
        f"{d['train']['truncated']:,} / {d['train']['dropped_overlong']:,} |",
        f"| tokens with a label (assistant) | {d['train']['label_tokens']:,} of {d['train']['tokens']:,} |",
        f"| batching | {'packed (attention kept inside each conversation)' if d['packing'] else 'padded to the longest'} |",
        f"| padding share | {100 * d['padding_share']:.1f}% |",
        f"| held-out conversations | {d['heldout']['kept']:,} ({d['heldout_source']}) |",
    ]
    for f in d["files"]:
        lines.append(f"| `{f['path']}` | {f['loaded']:,} loaded ({f['format']}), {f['skipped']} malformed skipped, "
                     f"{f['trimmed']} trimmed |")
    if summary.get("merged"):
        lines += ["", f"Merged plain model: `{summary['merged']}`."]
    text = path.read_text(encoding="utf-8") + "\n".join(lines) + "\n"
    atomic_write_text(path, text)


def main(argv: list[str]) -> int:
    cfg, _ = parse_config(
        SFTConfig, argv, "xiaolm sft",
        positionals={"run": "RUNDIR"}, unused={"distill.teacher_logits"},
    )
    summary, env = run_training(sft, cfg)
    if env.is_main:
        from xiaolm.train.report import print_summary

        print_summary(summary, file=sys.stdout)
        d = summary["data"]
        print(f"  data: {d['train']['kept']} conversations, {d['train']['truncated']} truncated, "
              f"{d['train']['dropped_overlong']} dropped, padding {100 * d['padding_share']:.1f}%", file=sys.stdout)
        if summary.get("merged"):
            print(f"  merged model: {summary['merged']}", file=sys.stdout)
    return int(summary.get("exit_code", 0))
