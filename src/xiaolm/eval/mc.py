"""``xiaolm eval mc``: multiple-choice accuracy (C-Eval / CMMLU style) by answer-letter likelihood, offline.

Data: a directory of CSV files, one subject per file, with a header naming ``Question``, ``A``, ``B``, ``C``, ``D``
and ``Answer`` (any case; an unnamed first column or ``id`` is the row id; other columns such as C-Eval's
``explanation`` are ignored). A directory holding ``dev/`` and ``test/`` (CMMLU's and C-Eval's layout) is read from
``--split`` (default ``test``) with few-shot examples from ``dev/``. A file's subject is its name without
``.csv`` and without a ``_test`` / ``_dev`` / ``_val`` suffix. A row whose answer is not one of A-D, or whose
fields are missing, is counted and reported with its file and line, never fatal.

Scoring (the usual letter-likelihood protocol of the C-Eval / CMMLU papers' "answer-only" setting):

    以下是单项选择题，请直接给出正确答案的选项。\\n\\n          (instruction; the subject name is not translated)
    [k worked examples from dev/, each: 题目：...\\nA. ...\\nB. ...\\nC. ...\\nD. ...\\n答案：X\\n\\n]
    题目：{question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案：

The prompt is encoded with ``<|endoftext|>`` in front (documents start after one in training) and the model's
log-probabilities of the four continuations ``A``, ``B``, ``C``, ``D`` after ``答案：`` are compared; the
prediction is the most likely of the four (each letter is one token for a byte-level BPE; a letter that
tokenises into several tokens is scored by the sum of their log-probabilities). Accuracy is reported per subject
and overall (micro: over all questions; macro: mean over subjects), with the 25% chance level beside it. The
probability mass the model puts on the four letters together (``letter_mass``) shows whether it has learnt the
answer format at all: a model near chance with a tiny letter mass is guessing. Prompts longer than the model's
context lose few-shot examples first, then the start of the question (counted as ``truncated``).

``--backend lm-eval`` runs the same task through lm-evaluation-harness on an exported Hugging Face directory
(``xiaolm export hf``) with a task definition written on the fly (``dataset_path: csv`` over the local files; no
Hub download), see ``xiaolm.eval.lm_eval_tasks``.
"""
from __future__ import annotations

import csv
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from xiaolm.config import opt, parse_config, save_config
from xiaolm.data.readers import csv_records
from xiaolm.eval.mc_data import _csvs, subject_of
from xiaolm.utils import atomic_write_json, fail, log, pick_device

LETTERS = ("A", "B", "C", "D")
CHANCE = 0.25
INSTRUCTION = "以下是单项选择题，请直接给出正确答案的选项。\n\n"
ANSWER_PREFIX = "答案："


@dataclass
class MCQuestion:
    subject: str
    qid: str
    question: str
    options: tuple[str, str, str, str]
    answer: int  # index into LETTERS
    where: str  # file:line


@dataclass
class MCData:
    questions: list[MCQuestion]
    dev: dict[str, list[MCQuestion]]
    malformed: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


# ================================================================================================== reading


def read_mc_csv(path: Path, malformed: list[str]) -> list[MCQuestion]:
    """Questions of one CSV file; bad rows are appended to ``malformed`` as ``file:line: reason``."""
    try:
        fh = open(path, encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise fail(f"{path}: cannot read ({exc.strerror})")
    with fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            malformed.append(f"{path}:1: empty file")
            return []
        except csv.Error as exc:
            raise fail(f"{path}:1: not CSV ({exc})")
        cols = {h.strip().lower(): i for i, h in enumerate(header)}
        need = {"question": None, "a": None, "b": None, "c": None, "d": None, "answer": None}
        missing = [k for k in need if k not in cols]
        if missing:
            raise fail(f"{path}:1: header {header} lacks column(s) {', '.join(missing)} "
                       f"(expected Question, A, B, C, D, Answer)")
        id_col = cols.get("id", 0 if header and header[0].strip() == "" else None)
        out = []
        for _first, line, row, exc in csv_records(reader):
            if exc is not None:
                malformed.append(f"{path}:{line}: unreadable CSV ({exc})")
                continue
            if not any(cell.strip() for cell in row):
                continue
            if len(row) < len(header):
                malformed.append(f"{path}:{line}: {len(row)} fields, the header has {len(header)}")
                continue
            answer = row[cols["answer"]].strip().upper()
            if answer not in LETTERS:
                malformed.append(f"{path}:{line}: Answer {row[cols['answer']]!r} is not one of A, B, C, D")
                continue
            question = row[cols["question"]].strip()
            if not question:
                malformed.append(f"{path}:{line}: empty Question")
                continue
            options = tuple(row[cols[k]].strip() for k in ("a", "b", "c", "d"))
            qid = row[id_col].strip() if id_col is not None and id_col < len(row) else str(len(out))
            out.append(MCQuestion(subject_of(path), qid, question, options, LETTERS.index(answer),  # type: ignore[arg-type]
                                  f"{path}:{line}"))
    return out


def load_mc_data(data: str | Path, split: str = "test", subjects: Optional[list[str]] = None,
                 limit: Optional[int] = None) -> MCData:
    """Questions from a CSV file, a directory of CSVs, or a CMMLU / C-Eval root with dev/ and test/ (or val/)."""
    data = Path(data)
    if not data.exists():
        raise fail(f"--data {data}: no such file or directory")
    malformed: list[str] = []
    dev_dir = None
    if data.is_file():
        files = [data]
    elif (data / split).is_dir():
        files = _csvs(data / split)
        dev_dir = data / "dev" if (data / "dev").is_dir() and split != "dev" else None
    else:
        files = _csvs(data)
        if not files and split == "test" and (data / "val").is_dir():
            files = _csvs(data / "val")
    if subjects:
        wanted = set(subjects)
        files = [f for f in files if subject_of(f) in wanted]
        unknown = wanted - {subject_of(f) for f in files}
        if unknown:
            raise fail(f"--subjects: no CSV for {', '.join(sorted(unknown))} in {data}")
    if not files:
        raise fail(f"--data {data}: no .csv files found (split {split!r})")
    questions: list[MCQuestion] = []
    for f in files:
        rows = read_mc_csv(f, malformed)
        questions.extend(rows[:limit] if limit else rows)
    dev: dict[str, list[MCQuestion]] = {}
    if dev_dir is not None:
        for f in _csvs(dev_dir):
            if subjects and subject_of(f) not in set(subjects):
                continue
            dev[subject_of(f)] = read_mc_csv(f, malformed)
    return MCData(questions, dev, malformed, [str(f) for f in files])


# ================================================================================================== prompts


def format_question(q: MCQuestion, with_answer: bool) -> str:
    text = f"题目：{q.question}\n" + "".join(f"{letter}. {opt}\n" for letter, opt in zip(LETTERS, q.options))
    return text + ANSWER_PREFIX + (LETTERS[q.answer] + "\n\n" if with_answer else "")


def build_prompt(q: MCQuestion, shots: list[MCQuestion]) -> str:
    return INSTRUCTION + "".join(format_question(s, True) for s in shots) + format_question(q, False)


def letter_continuations(tokenizer) -> list[list[int]]:
    """Token ids of each answer letter as it follows ``答案：`` (what the model would have to write)."""
    base = tokenizer.encode(ANSWER_PREFIX)
    conts = []
    for letter in LETTERS:
        ids = tokenizer.encode(ANSWER_PREFIX + letter)
        conts.append(ids[len(base):] if ids[: len(base)] == base and len(ids) > len(base) else tokenizer.encode(letter))
    return conts


def encode_prompts(questions: list[MCQuestion], dev: dict[str, list[MCQuestion]], tokenizer, shots: int,
                   max_len: int) -> tuple[list[list[int]], int, int]:
    """Prompt token ids (``<|endoftext|>`` first), dropping shots and then question text to fit ``max_len``.
    Returns (ids, prompts that lost shots, prompts truncated)."""
    prompts, fewer, truncated = [], 0, 0
    for q in questions:
        examples = [s for s in dev.get(q.subject, []) if s.question != q.question][:shots]
        k = len(examples)
        while True:
            ids = [tokenizer.eot_id] + tokenizer.encode(build_prompt(q, examples[:k]))
            if len(ids) <= max_len or k == 0:
                break
            k -= 1
        fewer += k < len(examples)
        if len(ids) > max_len:  # keep the end: the options and 答案：
            ids = [tokenizer.eot_id] + ids[len(ids) - max_len + 1:]
            truncated += 1
        prompts.append(ids)
    return prompts, fewer, truncated


# ================================================================================================== scoring


@torch.no_grad()
def score_letters(model, prompts: list[list[int]], continuations: list[list[int]], pad_id: int,
                  batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities [N, 4] of each continuation after each prompt, and the probability mass [N] of the four
    first tokens together. Prompts are left-padded in batches of similar length."""
    device = model.device
    single = all(len(c) == 1 for c in continuations)
    first = torch.tensor([c[0] for c in continuations], device=device)
    scores = torch.empty(len(prompts), len(LETTERS), dtype=torch.float64)
    mass = torch.empty(len(prompts), dtype=torch.float64)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        if single:
            rows = [prompts[i] for i in idx]
        else:  # one row per (prompt, letter): prompt + all but the last continuation token
            rows = [prompts[i] + c[:-1] for i in idx for c in continuations]
        longest = max(len(r) for r in rows)
        ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, longest - len(r):] = torch.tensor(r)
            mask[j, longest - len(r):] = 1
        ids, mask = ids.to(device), mask.to(device)
        padded = not bool(mask.all())
        if single:
            logits = model(ids, attention_mask=mask if padded else None, logits_to_keep=1).logits[:, -1].float()
            logp = torch.log_softmax(logits, dim=-1)
            scores[idx] = logp[:, first].double().cpu()
            mass[idx] = logp[:, first].exp().sum(-1).double().cpu()
            continue
        logits = model(ids, attention_mask=mask if padded else None).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        for j, i in enumerate(idx):
            for li, c in enumerate(continuations):
                row = j * len(continuations) + li
                n = len(c)
                positions = range(longest - n, longest)  # the logits that predict each continuation token
                scores[i, li] = sum(float(logp[row, p, t]) for p, t in zip(positions, c))
            mass[i] = float(logp[j * len(continuations), longest - len(continuations[0]), first].exp().sum())
    return scores, mass


def evaluate_mc(model, tokenizer, data: MCData, shots: int = 0, batch_size: int = 16) -> dict:
    """Accuracy per subject and overall; see the module docstring for the protocol."""
    if not data.questions:
        raise fail("no questions to evaluate")
    max_len = model.config.max_position_embeddings  # a prompt and its answer letter fit the model's context
    conts = letter_continuations(tokenizer)
    max_prompt = max_len - max(len(c) for c in conts) + 1
    prompts, fewer, truncated = encode_prompts(data.questions, data.dev, tokenizer, shots, max_prompt)
    scores, mass = score_letters(model, prompts, conts, tokenizer.pad_id, batch_size)
    pred = scores.argmax(dim=1)
    gold = torch.tensor([q.answer for q in data.questions])
    correct = pred == gold
    per: dict[str, dict] = {}
    for i, q in enumerate(data.questions):
        s = per.setdefault(q.subject, {"correct": 0, "total": 0})
        s["correct"] += int(correct[i])
        s["total"] += 1
    for s in per.values():
        s["accuracy"] = s["correct"] / s["total"]
    n = len(data.questions)
    accuracy = float(correct.float().mean())
    # A binomial standard error: how far from 25% a score must be before it means anything.
    stderr = math.sqrt(accuracy * (1 - accuracy) / n) if n else 0.0
    counts = torch.bincount(pred, minlength=4).tolist()
    return {
        "accuracy": accuracy,
        "accuracy_stderr": stderr,
        "chance": CHANCE,
        "macro_accuracy": sum(s["accuracy"] for s in per.values()) / len(per),
        "correct": int(correct.sum()),
        "questions": n,
        "subjects": dict(sorted(per.items())),
        "shots": shots,
        "prompts_with_fewer_shots": fewer,
        "prompts_truncated": truncated,
        "letter_mass": float(mass.mean()),
        "predicted_letters": dict(zip(LETTERS, counts)),
        "gold_letters": dict(zip(LETTERS, torch.bincount(gold, minlength=4).tolist())),
        "scoring": ("log-probability of the answer letter (A/B/C/D) right after '答案：', argmax over the four; "
                    "prompt = instruction + k dev examples + question with lettered options"),
        "prompt_example": build_prompt(data.questions[0], data.dev.get(data.questions[0].subject, [])[:shots]),
        "letter_tokens": conts,
        "malformed": len(data.malformed),
        "malformed_examples": data.malformed[:20],
    }


def print_result(result: dict, file=None) -> None:
    file = file or sys.stdout
    subjects = result["subjects"]
    width = max([len(s) for s in subjects] + [7])
    print(f"{'subject':<{width}}  {'correct':>7}  {'total':>5}  accuracy", file=file)
    for name, s in subjects.items():
        print(f"{name:<{width}}  {s['correct']:>7}  {s['total']:>5}  {100 * s['accuracy']:6.2f}%", file=file)
    print(f"{'overall':<{width}}  {result['correct']:>7}  {result['questions']:>5}  "
          f"{100 * result['accuracy']:6.2f}% (± {100 * result['accuracy_stderr']:.2f}), macro "
          f"{100 * result['macro_accuracy']:.2f}%   chance level: {100 * result['chance']:.0f}%", file=file)
    if result.get("predicted_letters"):
        print(f"{result['shots']}-shot; the model puts {100 * result['letter_mass']:.2f}% of its probability on the "
              f"four answer letters; predicted {result['predicted_letters']}, gold {result['gold_letters']}", file=file)
    else:
        print(f"{result['shots']}-shot, scored by {result.get('backend')}", file=file)
    if result.get("malformed"):
        print(f"{result['malformed']} malformed row(s) skipped, e.g. {result['malformed_examples'][0]}", file=file)


# ================================================================================================== CLI


@dataclass
class MCConfig:
    """Multiple-choice accuracy (C-Eval / CMMLU CSV) by answer-letter likelihood, offline. Reports accuracy per \
subject and overall beside the 25 percent chance level."""

    run: str = opt(None, "RUNDIR, checkpoint, quantised or Hugging Face directory")
    data: str = opt(None, "directory of C-Eval / CMMLU style CSVs (or a root with dev/ and test/), or one CSV",
                    required="--data CSVDIR is required")
    out: Optional[str] = opt(None, "write the result as JSON here")
    split: str = opt("test", "subfolder to evaluate when --data has dev/ and test/")
    shots: int = opt(0, "worked examples from dev/ before each question (dropped when the context is too short)")
    subjects: list[str] = opt([], "evaluate only these subjects (file names without .csv)")
    limit: Optional[int] = opt(None, "at most this many questions per subject")
    batch_size: int = opt(16, "prompts per forward pass")
    backend: Literal["xiaolm", "lm-eval"] = opt("xiaolm", "xiaolm: our scorer; lm-eval: lm-evaluation-harness "
                                                          "on a Hugging Face directory (xiaolm export hf)")
    tasks_dir: Optional[str] = opt(None, "lm-eval backend: keep the generated task YAMLs here (for the lm_eval "
                                         "command line: --include_path DIR --tasks xiaolm_mc)")
    device: str = opt("auto", "auto, cpu, cuda or mps")
    checkpoint: str = opt("latest", "which checkpoint of a RUNDIR: latest or best")


def main(argv: list[str]) -> int:
    from xiaolm.model.io import load_model

    cfg, _ = parse_config(MCConfig, argv, "xiaolm eval mc", positionals={"run": "RUNDIR"})
    if cfg.backend == "lm-eval":
        from xiaolm.eval.lm_eval_tasks import run_lm_eval

        result = run_lm_eval(cfg.run, cfg.data, split=cfg.split, shots=cfg.shots, subjects=cfg.subjects,
                             limit=cfg.limit, batch_size=cfg.batch_size, device=pick_device(cfg.device),
                             tasks_dir=cfg.tasks_dir)
    else:
        data = load_mc_data(cfg.data, cfg.split, cfg.subjects or None, cfg.limit)
        if data.malformed:
            log(f"eval mc: {len(data.malformed)} malformed row(s) skipped, first: {data.malformed[0]}")
        # a CheckpointError is an XiaolmError: the CLI prints it as one line
        model, tokenizer, info = load_model(cfg.run, device=pick_device(cfg.device), which=cfg.checkpoint)
        log(f"eval mc: {len(data.questions)} questions in {len(data.files)} subject(s), {cfg.shots}-shot")
        result = evaluate_mc(model, tokenizer, data, cfg.shots, cfg.batch_size)
        result = {"model": str(info.path), "data": str(cfg.data), "split": cfg.split, "backend": "xiaolm", **result}
    print_result(result)
    if cfg.out:
        atomic_write_json(cfg.out, result)
        save_config(cfg, Path(cfg.out).with_suffix(".config.yaml"))
    return 0
