"""Mixtures: several pretraining sources into one prepared corpus, several instruction sets into one SFT set.

A source's ``weight`` multiplies how often its documents (conversations) appear in the training split: 2.0 repeats
each twice, 0.5 keeps a stable half (chosen by hash), 1.5 keeps every one and repeats a stable half. ``max_docs``
caps the source before weighting (its first documents). Held-out splits are kept once, unweighted, so the held-out
loss measures every source as it is. The resulting shares (documents and characters) go into the report.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from xiaolm.config import opt
from xiaolm.utils import atomic_write_json, fail, log, read_jsonl, stable_hash


@dataclass
class CorpusSource:
    name: str = opt("", "short name of the source (its prepared copy goes to WORKDIR/data/sources/NAME)")
    inputs: list[str] = opt([], "files, directories, globs or hf:NAME datasets of this source")
    weight: float = opt(1.0, "repeat factor of this source's training documents in the mixture (0.5: a stable half)")
    max_docs: Optional[int] = opt(None, "use at most this many of its training documents (before weighting)")
    options: dict[str, Any] = opt({}, "prepare options for this source only (field, txt_mode, joiner, json_key, "
                                      "filters.min_chars, ...), over the recipe's prepare section")


@dataclass
class InstructSource:
    name: str = opt("", "short name of the instruction set")
    inputs: list[str] = opt([], "Alpaca / ShareGPT / OpenAI-messages files or directories")
    format: str = opt("auto", "layout: auto, alpaca, sharegpt or openai")
    weight: float = opt(1.0, "repeat factor of its training conversations in the mixture (0.5: a stable half)")
    max_conversations: Optional[int] = opt(None, "use at most this many of its conversations (before weighting)")
    hf_split: str = opt("train", "split of hf:NAME inputs")
    hf_config: Optional[str] = opt(None, "configuration name of hf:NAME inputs")


@dataclass
class InstructMixConfig:
    sources: list[InstructSource] = opt([], "instruction sets to mix into one SFT set (empty: build story "
                                            "instructions with `xiaolm data instruct` instead)")
    heldout_fraction: float = opt(0.02, "share of each source's conversations held out (by content hash)")
    max_heldout: int = opt(200, "held-out conversations kept in all (spread over the sources)")
    out: str = opt("", "output directory: train.jsonl, heldout.jsonl, report.json (default: WORKDIR/instruct)")


def copies(key: str, weight: float) -> int:
    """How many times a record appears: floor(weight), plus one more for a stable share frac(weight) of records."""
    if weight < 0:
        raise ValueError(f"a mixing weight must be >= 0, got {weight}")
    whole = math.floor(weight)
    frac = weight - whole
    return whole + int(frac > 0 and (stable_hash(key) % 10_000) < round(frac * 10_000))


def mix_corpus(sources: list[tuple[str, Path, float, Optional[int]]], out: Path) -> dict:
    """``sources``: (name, prepared dir, weight, max_docs). Writes out/train.jsonl, val.jsonl and report.json."""
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    with open(out / ".train.tmp", "w", encoding="utf-8") as tr, open(out / ".val.tmp", "w", encoding="utf-8") as va:
        for name, folder, weight, cap in sources:
            r = rows[name] = {"weight": weight, "max_docs": cap, "train_docs_in": 0, "train_docs": 0,
                              "train_chars": 0, "val_docs": 0, "val_chars": 0}
            for i, rec in enumerate(read_jsonl(folder / "train.jsonl")):
                if cap is not None and i >= cap:
                    break
                r["train_docs_in"] += 1
                n = copies(f"{name}:{rec.get('id', i)}", weight)
                line = json.dumps({**rec, "source": f"{name}:{rec.get('source', '')}"}, ensure_ascii=False) + "\n"
                for _ in range(n):
                    tr.write(line)
                r["train_docs"] += n
                r["train_chars"] += n * len(rec["text"])
            if (folder / "val.jsonl").is_file():
                for rec in read_jsonl(folder / "val.jsonl"):
                    va.write(json.dumps({**rec, "source": f"{name}:{rec.get('source', '')}"}, ensure_ascii=False) + "\n")
                    r["val_docs"] += 1
                    r["val_chars"] += len(rec["text"])
    (out / ".train.tmp").replace(out / "train.jsonl")
    (out / ".val.tmp").replace(out / "val.jsonl")
    total_chars = sum(r["train_chars"] for r in rows.values()) or 1
    total_docs = sum(r["train_docs"] for r in rows.values()) or 1
    for r in rows.values():
        r["share_chars"] = round(r["train_chars"] / total_chars, 4)
        r["share_docs"] = round(r["train_docs"] / total_docs, 4)
    kept = sum(r["train_docs"] + r["val_docs"] for r in rows.values())
    report = {"mixture": rows, "documents_kept": kept,
              "train_documents": sum(r["train_docs"] for r in rows.values()),
              "val_documents": sum(r["val_docs"] for r in rows.values()),
              "train_characters": sum(r["train_chars"] for r in rows.values())}
    if report["train_documents"] == 0:
        raise fail(f"{out}: the mixture has no training documents (weights {[s[2] for s in sources]})")
    atomic_write_json(out / "report.json", report)
    return report


def materialise_hf(spec: str, folder: Path, split: str = "train", config: Optional[str] = None,
                   limit: Optional[int] = None) -> Path:
    """``hf:NAME`` (or ``hf:NAME:CONFIG``) as a local JSON Lines file (once; a rerun reuses it), so the loaders
    that read files read it."""
    name = spec[len("hf:"):]
    if ":" in name:
        name, config = name.split(":", 1)
    path = folder / (name.replace("/", "__") + (f"__{config}" if config else "") + f"__{split}.jsonl")
    if path.is_file():
        return path
    try:
        import datasets
    except ImportError:
        raise fail(f"{spec}: Hugging Face inputs need the 'datasets' package (pip install 'xiaolm[data]')") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # network, missing dataset, bad split: one line naming the dataset
        raise fail(f"{spec}: cannot load Hugging Face dataset (split {split!r}): {exc}") from None
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    ds.to_json(str(tmp), force_ascii=False)
    tmp.replace(path)
    return path


def mix_instructions(cfg: InstructMixConfig, out: Path) -> dict:
    """Load every source (any layout), hold out a hash share, weight the rest; write train.jsonl, heldout.jsonl."""
    from xiaolm.data.formats import expand_paths, load_conversations

    train, heldout, rows = [], [], {}
    cut = round(cfg.heldout_fraction * 10_000)
    for src in cfg.sources:
        inputs = [str(materialise_hf(i, out / "sources", src.hf_split, src.hf_config, src.max_conversations))
                  if i.startswith("hf:") else i for i in src.inputs]
        try:
            files = expand_paths(inputs, split="train", skip_reports=True)
        except FileNotFoundError as exc:
            raise fail(f"instruct source {src.name!r}: {exc}")
        try:
            convs, reports = load_conversations(files, src.format)
        except ValueError as exc:
            raise fail(f"instruct source {src.name!r}: {exc}")
        if src.max_conversations is not None:
            convs = convs[: src.max_conversations]
        r = rows[src.name] = {"weight": src.weight, "files": [str(f) for f in files], "loaded": len(convs),
                              "skipped": sum(x.skipped for x in reports), "train": 0, "heldout": 0}
        for c in convs:
            key = json.dumps(c.messages, ensure_ascii=False, sort_keys=True)
            rec = {"messages": c.messages, "source": src.name, "where": c.where}
            if stable_hash(key) % 10_000 < cut:
                heldout.append(rec)
                r["heldout"] += 1
                continue
            for _ in range(copies(f"{src.name}:{key}", src.weight)):
                train.append(rec)
                r["train"] += 1
        log(f"instruct source {src.name}: {r['loaded']} conversations ({r['skipped']} malformed skipped), "
            f"{r['train']} training rows at weight {src.weight}, {r['heldout']} held out")
    if not train:
        raise fail("the instruction mixture has no training conversations (see the messages above)")
    # Shuffle deterministically so packing and the held-out cap see every source, not the first file's.
    train.sort(key=lambda x: stable_hash(json.dumps(x["messages"], ensure_ascii=False) + x["source"]))
    heldout.sort(key=lambda x: stable_hash(json.dumps(x["messages"], ensure_ascii=False)))
    heldout = heldout[: cfg.max_heldout]
    from xiaolm.utils import write_jsonl

    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "heldout.jsonl", heldout)
    total = len(train)
    for r in rows.values():
        r["share"] = round(r["train"] / total, 4)
    report = {"mixture": rows, "train_samples": len(train), "heldout_samples": len(heldout)}
    atomic_write_json(out / "report.json", report)
    return report
