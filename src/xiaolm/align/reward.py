"""``xiaolm reward``: a reward model (scalar head on the fine-tuned model, Bradley-Terry loss), and
``xiaolm reward score`` to score responses with one.

Model. ``RewardModel`` is the Llama body of the SFT model with a linear head ``score`` (hidden -> 1) reading the
final-norm hidden state of the last real token of prompt + response (right padding; the true length of each row is
carried with the batch, so a padding id that also occurs in text cannot confuse it). The head starts at zero, so at
step 0 every score is 0 and the loss is ln 2. Loss per pair: ``-log σ(s_chosen - s_rejected)`` (Bradley-Terry),
plus optionally ``center_coef * (s_c + s_r)²`` to keep scores near zero.

Sequences. ChatML prompt (as SFT) + response + ``<|im_end|>``. A pair longer than the context keeps its *last*
``seq_len`` tokens (the response, which is what differs between chosen and rejected, and the end of the prompt);
such pairs are counted.

Held-out pairs are chosen by a hash of the prompt, so two pairs with the same prompt are always on the same side and
the accuracy measures generalisation to new prompts. The run is a RUNDIR made by the shared Trainer (checkpoints,
``--resume``, metrics.jsonl with training accuracy and margin, ``val_loss`` / ``val_accuracy`` at each evaluation,
report.md, summary.json). Its checkpoints hold the body and the head; ``load_reward_model`` reads them.

``xiaolm reward score RMDIR --data FILE`` scores every response of a file: preference pairs in any layout
``xiaolm data pairs`` reads (both sides are scored and the pairwise accuracy is printed), or prompt + response
records (``{"prompt": str | messages, "response": str}``, or chat records whose last turn is the assistant's).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from xiaolm.align.common import PairTrainConfig, SeededBatches
from xiaolm.config import opt, parse_config
from xiaolm.model.io import load_reward_model
from xiaolm.model.reward import RewardModel
from xiaolm.train.dist import DistEnv, setup_distributed
from xiaolm.train.engine import Trainer, run_training
from xiaolm.train.schedule import resolve_steps
from xiaolm.utils import fail, log, seed_everything, stable_hash


# ---------------------------------------------------------------------------------------------- data


def encode_scored(tokenizer, prompt: list[dict], response: str, seq_len: int) -> tuple[list[int], bool]:
    """Token ids of prompt + response + ``<|im_end|>``, keeping the last ``seq_len`` when longer; and whether it
    was cut."""
    from xiaolm.align.common import prompt_ids

    ids = prompt_ids(tokenizer, prompt) + tokenizer.encode(response, allow_special=False) + [tokenizer.im_end_id]
    if len(ids) > seq_len:
        return ids[-seq_len:], True
    return ids, False


def collate_scored(rows: list[list[int]], pad_id: int) -> dict:
    width = max(len(r) for r in rows)
    x = np.full((len(rows), width), pad_id, dtype=np.int64)
    for i, r in enumerate(rows):
        x[i, : len(r)] = r
    return {"input_ids": torch.from_numpy(x), "lengths": torch.tensor([len(r) for r in rows], dtype=torch.long)}


@torch.no_grad()
def score_texts(model: RewardModel, tokenizer, items: list[tuple[list[dict], str]], batch_size: int = 32) -> list[float]:
    """Scores of ``(prompt messages, response)`` items, in length-sorted batches, each cut to the model's context."""
    encoded = [encode_scored(tokenizer, p, r, model.config.max_position_embeddings)[0] for p, r in items]
    return score_ids(model, encoded, tokenizer.pad_id, batch_size)


@torch.no_grad()
def score_ids(model: RewardModel, encoded: list[list[int]], pad_id: int, batch_size: int = 32) -> list[float]:
    was_training = model.training
    model.eval()
    out = [0.0] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        b = collate_scored([encoded[i] for i in idx], pad_id)
        scores = model(b["input_ids"].to(model.device), b["lengths"].to(model.device)).cpu().tolist()
        for i, s in zip(idx, scores):
            out[i] = s
    model.train(was_training)
    return out


def is_heldout_prompt(prompt: list[dict], fraction: float) -> bool:
    """By a hash of the prompt: the same prompt is always on the same side."""
    from xiaolm.data.pairs import prompt_key

    return stable_hash(prompt_key(prompt)) % 10_000 < round(fraction * 10_000)


@dataclass
class EncodedPairs:
    chosen: list[list[int]]
    rejected: list[list[int]]
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.chosen)


def encode_pairs(tokenizer, pairs: list[dict], seq_len: int) -> EncodedPairs:
    out = EncodedPairs([], [])
    for p in pairs:
        c, tc = encode_scored(tokenizer, p["prompt"], p["chosen"], seq_len)
        r, tr = encode_scored(tokenizer, p["prompt"], p["rejected"], seq_len)
        out.chosen.append(c)
        out.rejected.append(r)
        out.truncated += int(tc or tr)
    return out


class PairBatches(SeededBatches):
    """``batch_fn(step, micro)``: chosen rows then rejected rows of ``micro_batch`` pairs, a pure function of (step,
    micro, rank) over per-epoch seeded permutations of the pairs."""

    empty = "no training pairs"

    def __init__(self, pairs: EncodedPairs, micro_batch: int, accum: int, env: DistEnv, seed: int, pad_id: int):
        super().__init__(pairs, micro_batch, accum, env, seed, pad_id)
        self.pairs = pairs

    def __call__(self, step: int, micro: int) -> dict:
        idx = self.indices(step, micro)
        rows = [self.pairs.chosen[i] for i in idx] + [self.pairs.rejected[i] for i in idx]
        batch = collate_scored(rows, self.pad_id)
        batch["num_tokens"] = int(batch["lengths"].sum())
        return batch


def reward_loss(model, batch: dict, center_coef: float = 0.0):
    from xiaolm.align.losses import bradley_terry_loss

    scores = model(batch["input_ids"], batch["lengths"])
    n = scores.shape[0] // 2
    sc, sr = scores[:n], scores[n:]
    loss = bradley_terry_loss(sc, sr).sum()  # summed over the pairs; the engine divides by the step's pairs
    if center_coef:
        loss = loss + center_coef * ((sc + sr) ** 2).sum()
    return loss, n, {"accuracy": (sc > sr).float().mean(), "margin": (sc - sr).mean().detach(),
                  "score_mean": scores.mean().detach()}


@torch.no_grad()
def pair_accuracy(model, pairs: EncodedPairs, pad_id: int, batch_size: int = 32) -> dict:
    """Bradley-Terry loss, pairwise accuracy (ties count half) and mean margin over ``pairs``."""
    from xiaolm.align.losses import bradley_terry_loss

    sc = torch.tensor(score_ids(model, pairs.chosen, pad_id, batch_size))
    sr = torch.tensor(score_ids(model, pairs.rejected, pad_id, batch_size))
    acc = ((sc > sr).float() + 0.5 * (sc == sr).float()).mean()
    return {"loss": float(bradley_terry_loss(sc, sr).mean()), "accuracy": float(acc),
            "margin": float((sc - sr).mean()), "pairs": len(pairs)}


# ---------------------------------------------------------------------------------------------- training


@dataclass
class RewardTrainConfig(PairTrainConfig):
    """The shared training options with defaults for a reward model (fine-tuning a trained body and a new head)."""

    lr: float = opt(1e-4, "peak learning rate")


@dataclass
class RewardConfig:
    """Train a reward model: the fine-tuned model with a scalar head on the last token, Bradley-Terry loss on \
preference pairs, pairwise accuracy on held-out prompts.
    To score responses with a trained one: xiaolm reward score RMDIR --data FILE [--out scores.jsonl]
    examples:
      xiaolm reward runs/sft --data data/pairs.jsonl --out runs/reward
      xiaolm reward score runs/reward --data data/pairs_heldout.jsonl
    """

    run: str = opt(None, "the model to start from (the SFT RUNDIR, a checkpoint or a Hugging Face Llama dir)")
    data: list[str] = opt([], "preference pairs (xiaolm data pairs output, or any layout it reads)")
    out: str = opt("runs/reward", "output RMDIR: checkpoints, metrics.jsonl, config.yaml, report.md, summary.json")
    heldout: list[str] = opt([], "held-out pair files (default: a hash split of --data by prompt)")
    heldout_fraction: float = opt(0.1, "share of prompts held out for the accuracy when --heldout is not given")
    checkpoint: str = opt("latest", "which checkpoint of RUNDIR to start from: latest or best")
    seq_len: Optional[int] = opt(None, "context for prompt + response (default: the model's); longer pairs keep "
                                       "their last seq_len tokens")
    epochs: float = opt(2.0, "passes over the training pairs (when --max-steps is not given)")
    center_coef: float = opt(0.0, "add center_coef * (s_chosen + s_rejected)^2 to keep scores near zero")
    eval_batch_size: int = opt(32, "sequences per scoring forward pass")
    train_eval_pairs: int = opt(256, "training pairs also scored at the end (to show the train/held-out gap)")
    train: RewardTrainConfig = field(default_factory=lambda: RewardTrainConfig())


def train_reward(cfg: RewardConfig, env: Optional[DistEnv] = None) -> dict:
    from xiaolm.data.pairs import load_preferences
    from xiaolm.model.io import CheckpointError, load_model

    if not cfg.run:
        raise fail("give the model to start from: xiaolm reward SFTDIR --data PAIRS --out RMDIR")
    if not cfg.data:
        raise fail("--data is required: preference pairs (xiaolm data pairs)")
    env = env or setup_distributed(cfg.train.device)
    seed_everything(cfg.train.seed)
    try:
        pairs, labelled, reports = load_preferences(cfg.data)
        held_pairs = load_preferences(cfg.heldout)[0] if cfg.heldout else None
    except FileNotFoundError as exc:
        raise fail(str(exc))
    for r in reports:
        log(r.summary())
    if labelled:
        log(f"note: {len(labelled)} unpaired labelled responses ignored (a Bradley-Terry model needs pairs)")
    if held_pairs is None:
        held_pairs = [p for p in pairs if is_heldout_prompt(p["prompt"], cfg.heldout_fraction)]
        pairs = [p for p in pairs if not is_heldout_prompt(p["prompt"], cfg.heldout_fraction)]
        how = f"hash split by prompt, {cfg.heldout_fraction:.0%}"
    else:
        how = "files: " + ", ".join(cfg.heldout)
    if not pairs:
        raise fail("no training pairs left after the held-out split")
    try:
        policy, tokenizer, info = load_model(cfg.run, device="cpu", dtype=torch.float32, which=cfg.checkpoint)
    except CheckpointError as exc:
        raise fail(str(exc))
    model = RewardModel.from_policy(policy)
    del policy
    seq = min(cfg.seq_len or model.config.max_position_embeddings, model.config.max_position_embeddings)
    train_enc = encode_pairs(tokenizer, pairs, seq)
    held_enc = encode_pairs(tokenizer, held_pairs, seq)
    t = cfg.train
    batches = PairBatches(train_enc, t.micro_batch_size, t.grad_accum_steps, env, t.seed, tokenizer.pad_id)
    from xiaolm.align.common import steps_for_epochs

    mean_len = float(np.mean([len(x) for x in train_enc.chosen + train_enc.rejected]))
    tokens_per_step = int(2 * batches.global_batch * mean_len)
    default = (None if t.max_steps or t.max_tokens
               else steps_for_epochs(cfg.epochs, len(train_enc), batches.global_batch))
    total_steps = resolve_steps(t, tokens_per_step, default_steps=default)

    def eval_fn(m, step):
        if not len(held_enc):
            return {}
        r = pair_accuracy(m, held_enc, tokenizer.pad_id, cfg.eval_batch_size)
        return {"val_loss": r["loss"], "val_accuracy": r["accuracy"], "val_margin": r["margin"]}

    out = Path(cfg.out)
    trainer = Trainer(t, model, out, total_steps=total_steps, dist_env=env,
                      full_config=cfg, tokenizer=tokenizer, name="reward",
                      extra_meta={"base": str(cfg.run), "head": "score: last real token -> scalar"})
    trainer.open_run_dir()  # a resume that does not fit is refused before anything in OUT is written
    if env.is_main:
        log(f"reward model on {cfg.run}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
            f"{len(train_enc)} training pairs, {len(held_enc)} held-out ({how}); "
            f"{train_enc.truncated + held_enc.truncated} pairs longer than {seq} tokens kept their end; "
            f"{total_steps} steps; device {env.device}")
    result = trainer.fit(batches, lambda m, b: reward_loss(m, b, cfg.center_coef), eval_fn)
    model = trainer.raw_model
    train_sub = EncodedPairs(train_enc.chosen[: cfg.train_eval_pairs], train_enc.rejected[: cfg.train_eval_pairs])
    train_acc = pair_accuracy(model, train_sub, tokenizer.pad_id, cfg.eval_batch_size)
    held = pair_accuracy(model, held_enc, tokenizer.pad_id, cfg.eval_batch_size) if len(held_enc) else None
    summary = {
        "run": str(out), "base": str(cfg.run), **result.summary(total_steps), "device": env.device,
        "world_size": env.world_size,
        "train_pairs": len(train_enc), "heldout_pairs": len(held_enc), "heldout_source": how,
        "truncated_pairs": train_enc.truncated + held_enc.truncated, "seq_len": seq,
        "train_accuracy": train_acc["accuracy"], "heldout_accuracy": held["accuracy"] if held else None,
        "heldout_loss": held["loss"] if held else None, "heldout_margin": held["margin"] if held else None,
        "val_loss": held["loss"] if held else None,
        "files": [r.to_dict() for r in reports],
    }
    if env.is_main:
        from xiaolm.train.report import write_report
        from xiaolm.utils import atomic_write_json, atomic_write_text

        atomic_write_json(out / "summary.json", summary)
        path = write_report(out, summary, cfg, title="xiaolm reward model report")
        extra = ["", "## Pairwise accuracy", "", "| pairs | count | accuracy |", "|---|---|---|",
                 f"| training (first {len(train_sub)}) | {len(train_sub)} | {100 * train_acc['accuracy']:.1f}% |"]
        if held:
            extra.append(f"| held-out ({how}) | {len(held_enc)} | {100 * held['accuracy']:.1f}% |")
        extra += ["", "Chance is 50%. Score responses with `xiaolm reward score RMDIR --data FILE`."]
        atomic_write_text(path, path.read_text(encoding="utf-8") + "\n".join(extra) + "\n")
    return summary


# ---------------------------------------------------------------------------------------------- scoring CLI


@dataclass
class ScoreConfig:
    """Score responses with a reward model: every side of preference pairs (printing the pairwise accuracy), or \
prompt + response records. Scores are printed as a summary and written with --out."""

    run: str = opt(None, "reward model RMDIR (xiaolm reward)")
    data: list[str] = opt([], "files to score: preference pairs (any layout xiaolm data pairs reads) or "
                              "prompt + response records ({prompt, response} or chat records ending with the answer)",
                    required="--data is required")
    out: Optional[str] = opt(None, "write each record with its score(s) here (JSON Lines)")
    batch_size: int = opt(32, "sequences per forward pass")
    device: str = opt("auto", "auto, cpu, cuda or mps")
    checkpoint: str = opt("latest", "which checkpoint of RMDIR: latest or best")


def _response_record(rec: object) -> tuple[list[dict], str]:
    """A prompt + response record -> (prompt messages, response)."""
    from xiaolm.data.formats import RecordError, convert_record
    from xiaolm.data.pairs import PairError, _answer_text, _message_list, _prompt_from_text

    if not isinstance(rec, dict):
        raise PairError(f"a record must be a JSON object, got {type(rec).__name__}")
    if "response" in rec or "completion" in rec:
        key = "response" if "response" in rec else "completion"
        if "prompt" not in rec and "question" not in rec:
            raise PairError("missing field 'prompt'")
        prompt = (_message_list(rec["prompt"], "'prompt'") if isinstance(rec.get("prompt"), list)
                  else _prompt_from_text(rec, "prompt" if "prompt" in rec else "question"))
        return prompt, _answer_text(rec[key], f"'{key}'")
    try:
        messages, _note, _layout = convert_record(rec, "auto", require_answer=True)
    except RecordError as exc:
        raise PairError(f"{exc} (expected a pair, {{prompt, response}}, or a chat record)") from None
    return messages[:-1], messages[-1]["content"]


def score_main(argv: list[str]) -> int:
    from xiaolm.data.formats import iter_json_records
    from xiaolm.data.pairs import PairError, convert_pair_record, expand_pair_paths
    from xiaolm.model.io import CheckpointError
    from xiaolm.utils import pick_device, write_jsonl

    cfg, _ = parse_config(
        ScoreConfig, argv, "xiaolm reward score",
        positionals={"run": "RMDIR"},
    )
    try:
        files = expand_pair_paths(cfg.data)
    except FileNotFoundError as exc:
        raise fail(str(exc))
    try:
        model, tokenizer, _info = load_reward_model(cfg.run, device=pick_device(cfg.device), which=cfg.checkpoint)
    except CheckpointError as exc:
        raise fail(str(exc))
    records, items, problems = [], [], []
    for path in files:
        for line, rec, error in iter_json_records(path):
            where = f"{path}:{line}"
            if error is not None:
                problems.append(f"{where}: {error}")
                continue
            try:
                kind, norm, _layout = convert_pair_record(rec)
            except PairError:
                kind = None
            if kind == "pair":
                records.append(("pair", rec, where, len(items)))
                items += [(norm["prompt"], norm["chosen"]), (norm["prompt"], norm["rejected"])]
                continue
            try:
                prompt, response = _response_record(rec)
            except PairError as exc:
                problems.append(f"{where}: {exc}")
                continue
            records.append(("one", rec, where, len(items)))
            items.append((prompt, response))
    for p in problems[:10]:
        log(f"malformed: {p}")
    if len(problems) > 10:
        log(f"... {len(problems) - 10} more malformed records")
    if not items:
        raise fail("nothing to score in --data (see the messages above)")
    scores = score_texts(model, tokenizer, items, cfg.batch_size)
    out_records, n_pairs, wins = [], 0, 0.0
    singles = []
    for kind, rec, where, i in records:
        rec = dict(rec) if isinstance(rec, dict) else {"record": rec}
        if kind == "pair":
            sc, sr = scores[i], scores[i + 1]
            rec.update(score_chosen=round(sc, 6), score_rejected=round(sr, 6))
            n_pairs += 1
            wins += 1.0 if sc > sr else 0.5 if sc == sr else 0.0
        else:
            rec["score"] = round(scores[i], 6)
            singles.append(scores[i])
        rec.setdefault("source", where)
        out_records.append(rec)
    if cfg.out:
        write_jsonl(cfg.out, out_records)
        log(f"wrote {cfg.out}")
    parts = [f"scored {len(items)} responses in {len(records)} records ({len(problems)} malformed skipped)"]
    if n_pairs:
        parts.append(f"{n_pairs} pairs: pairwise accuracy {100 * wins / n_pairs:.1f}% (chance 50%)")
    if singles:
        mean = sum(singles) / len(singles)
        sd = math.sqrt(sum((s - mean) ** 2 for s in singles) / len(singles))
        parts.append(f"{len(singles)} responses: mean score {mean:.4f} (sd {sd:.4f})")
    print("; ".join(parts), file=sys.stdout)
    return 0


def main(argv: list[str]) -> int:
    if argv and argv[0] == "score":
        return score_main(argv[1:])
    cfg, _ = parse_config(
        RewardConfig, argv, "xiaolm reward",
        positionals={"run": "SFTDIR"},
        unused={"train.loss_chunk_size"},  # a scalar head on the last token: no language-model loss to chunk
    )
    summary, env = run_training(train_reward, cfg)
    if env.is_main:
        acc = summary.get("heldout_accuracy")
        print(f"done: {summary['run']}: {summary['steps']} steps, {summary['wall_s']:.1f} s; pairwise accuracy "
              f"train {100 * summary['train_accuracy']:.1f}%"
              + (f", held-out {100 * acc:.1f}% on {summary['heldout_pairs']} pairs" if acc is not None else ""),
              file=sys.stdout)
    return int(summary.get("exit_code", 0))
