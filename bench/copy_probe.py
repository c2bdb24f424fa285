"""Does a model copy from its context? Two probes behind docs/RECIPE.md's reading of the instruction headline.

- ``names``: in held-out stories the protagonist's name is replaced by a fresh three-character name ("阿" + two
  random characters) that no story uses. Its first mention cannot be predicted; later mentions can only be
  predicted by copying from the context. Printed: summed loss (nats) over the name's tokens at the first mention
  and, averaged, at later mentions. A model that copies names has a far smaller second figure.
- ``prompt`` (chat models): for held-out instructions carrying 开头 (the answer begins with a given sentence),
  随机句子 (a given sentence must appear) or 词汇 (given words must appear), the teacher-forced loss on the first
  40 tokens of the reference answer, with its own instruction and with the instruction of the next held-out story
  carrying the same constraint. The gap (swapped minus own, nats/token) is how much the model reads the prompt; a
  model that copied the given opening would score near zero on it with its own instruction.

    python bench/copy_probe.py RUN [RUN ...] --stories stories.jsonl --instruct instruct/heldout.jsonl

Every run is probed on the same texts, so rows compare. CPU is enough (a few seconds per run).
"""
from __future__ import annotations

import argparse
import json
import random
import re

import torch
import torch.nn.functional as F

NAME_PATTERNS = (re.compile(r"名字叫(\w\w)[，。]"), re.compile(r"名叫(\w\w)的"))
FRESH = "松柏桃李梅兰竹菊星辰云海"
KINDS = ("开头", "随机句子", "词汇")


def token_losses(model, ids: list[int]) -> torch.Tensor:
    """Loss of each token of ``ids`` after the first, given the tokens before it."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits
    return F.cross_entropy(logits[0].float(), torch.tensor(ids[1:]), reduction="none")


def name_probe(model, tok, stories: list[str], max_chars: int = 300) -> dict:
    rng = random.Random(0)
    first, later = [], []
    for story in stories:
        found = next((m for m in (p.search(story) for p in NAME_PATTERNS) if m), None)
        if not found:
            continue
        fresh = "阿" + rng.choice(FRESH) + rng.choice(FRESH)
        text = story.replace(found.group(1), fresh)[:max_chars]
        mentions = [m.start() for m in re.finditer(fresh, text)]
        if len(mentions) < 3:
            continue
        ids = [tok.eot_id] + tok.encode(text)
        offsets, pos = [], 0  # character offset of each predicted token (ids[1:])
        for t in ids[1:]:
            offsets.append(pos)
            pos += len(tok.decode([t]))
        losses = token_losses(model, ids)

        def name_loss(start: int):
            picked = [k for k, off in enumerate(offsets) if start <= off < start + len(fresh)]
            return float(losses[picked].sum()) if picked else None

        a, rest = name_loss(mentions[0]), [x for x in map(name_loss, mentions[1:]) if x is not None]
        if a is not None and rest:
            first.append(a)
            later.append(sum(rest) / len(rest))
    n = len(first)
    return {"stories": n, "first": sum(first) / max(n, 1), "later": sum(later) / max(n, 1)}


def prompt_probe(model, tok, rows: list[dict], answer_tokens: int = 40) -> dict:
    from xiaolm.tokenizer.chat import encode_conversation

    out = {}
    for kind in KINDS:
        chosen = [r for r in rows if kind in r.get("constraints", {})]
        own, swapped = [], []
        for i, row in enumerate(chosen):
            for prompt_row, acc in ((row, own), (chosen[(i + 1) % len(chosen)], swapped)):
                ids, mask = encode_conversation(tok, [prompt_row["messages"][0], row["messages"][1]])
                start = mask.index(True)
                acc.append(float(token_losses(model, ids[: start + answer_tokens])[start - 1:].mean()))
        if chosen:
            out[kind] = {"n": len(chosen), "own": sum(own) / len(own), "swapped": sum(swapped) / len(swapped)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="RUNDIRs or checkpoints")
    ap.add_argument("--stories", help="JSON Lines of stories (name probe)")
    ap.add_argument("--field", default="story_zh")
    ap.add_argument("--limit", type=int, default=300, help="stories read for the name probe")
    ap.add_argument("--instruct", help="held-out instructions, xiaolm data instruct's heldout.jsonl (prompt probe)")
    args = ap.parse_args(argv)
    if not (args.stories or args.instruct):
        ap.error("give --stories, --instruct or both")
    from xiaolm.model.io import load_model

    stories = []
    if args.stories:
        with open(args.stories, encoding="utf-8") as f:
            stories = [json.loads(line)[args.field] for line, _ in zip(f, range(args.limit))]
    rows = []
    if args.instruct:
        with open(args.instruct, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    head = "| run | fresh name: first / later mentions (nats) | " + " | ".join(
        f"{k}: own / swapped prompt (gap)" for k in KINDS) + " |"
    print(head)
    print("|" + "|".join("---" for _ in head.split("|")[1:-1]) + "|")
    for run in args.runs:
        model, tok, _ = load_model(run, device="cpu")
        model.eval()
        cells = []
        if stories:
            r = name_probe(model, tok, stories)
            cells.append(f"{r['first']:.2f} / {r['later']:.2f} ({r['stories']} stories)")
        else:
            cells.append("-")
        p = prompt_probe(model, tok, rows) if rows else {}
        for k in KINDS:
            cells.append(f"{p[k]['own']:.3f} / {p[k]['swapped']:.3f} ({p[k]['swapped'] - p[k]['own']:+.3f})"
                         if k in p else "-")
        print(f"| {run} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
