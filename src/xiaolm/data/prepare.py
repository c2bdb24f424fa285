"""``xiaolm data prepare``: raw text in, clean deduplicated documents split into train and validation out.

Pipeline, streaming in input order (so the output order is deterministic):

    read (readers.iter_records) -> clean (clean.Cleaner) -> split documents over max_chars (or drop them)
    -> filters (clean.filter_reasons) -> exact and near-duplicate removal (dedup.Deduplicator) -> train/val

Records are read in batches; cleaning, filtering and the MinHash signatures of a batch can run in worker processes
(``workers``), while reading, deduplication (against everything kept so far) and writing stay in the main process
and in input order, so the output is the same for any number of workers.

Outputs in ``OUT``: ``train.jsonl`` and ``val.jsonl`` (records ``{"text", "id", "source"}``; ``id`` is a hash of
the text, ``source`` is ``file:line`` or ``file#row``, with ``/pN`` for the N-th piece of a split document),
``report.json`` and ``config.yaml`` (the resolved config, itself a valid ``--config`` recipe).

Train/validation split: a document goes to validation when ``stable_hash(text) % 10000 <
round(val_fraction * 10000)``. It depends on nothing but the document's own text, so adding or removing other data
never moves a document between splits. There is deliberately no "at least N validation documents" option: topping
the split up would break that rule; a tiny corpus gets a tiny (possibly empty) validation set and the report says
so in ``warnings``.

Accounting, checked by the tests: ``documents_in + pieces_added_by_split == documents_kept + sum(dropped) +
duplicates_exact + duplicates_near`` where ``pieces_added_by_split`` is the number of extra documents made by
splitting long ones.
"""
from __future__ import annotations

import os
from typing import Any

from xiaolm.config import ConfigError, parse_config
# PrepareConfig, apply_overrides, is_validation, document_id and validate_config are defined in prepare_core and
# imported from here by callers
from xiaolm.data.prepare_core import PrepareConfig, apply_overrides, document_id, is_validation, run_prepare, \
    validate_config  # noqa: F401
from xiaolm.data.readers import InputError
from xiaolm.utils import fail, log


# ---------------------------------------------------------------------------------------------- prepare


def prepare(inputs: list[str], out_dir: str | os.PathLike, cfg: PrepareConfig | None = None,
            **overrides: Any) -> dict:
    """Run the pipeline and return the report (also written to ``out_dir/report.json``).

    ``overrides`` set config options by name (``field="story_zh"``, ``min_chars=5``, ``**{"dedup.threshold":
    0.9}``). Raises :class:`~xiaolm.data.readers.InputError` for a missing or unreadable input, before any output
    is written, and ValueError for an option out of range. ``engine="datatrove"`` runs
    :func:`xiaolm.data.prepare_datatrove.prepare_datatrove`, else :func:`xiaolm.data.prepare_core.run_prepare`
    runs here.
    """
    cfg = apply_overrides(cfg or PrepareConfig(), overrides)
    cfg.inputs = [str(i) for i in inputs]
    cfg.out = str(out_dir)
    validate_config(cfg)
    if cfg.engine == "datatrove":
        from xiaolm.data.prepare_datatrove import prepare_datatrove

        return prepare_datatrove(cfg)
    return run_prepare(cfg)


# ---------------------------------------------------------------------------------------------- CLI


def _summary(report: dict) -> str:
    lines = [
        f"documents in {report['documents_in']:,} ({report['characters_in']:,} chars) -> kept "
        f"{report['documents_kept']:,} ({report['characters_kept']:,} chars): train {report['train']['documents']:,}, "
        f"val {report['val']['documents']:,}",
        "dropped: " + ", ".join(f"{k} {v:,}" for k, v in report["dropped"].items())
        + f"; duplicates exact {report['duplicates_exact']:,}, near {report['duplicates_near']:,}",
        f"malformed records: {report['malformed_count']:,}"
        + (f" ({', '.join(f'{k} {v}' for k, v in report['malformed_by_reason'].items())})"
           if report["malformed_count"] else ""),
        f"{report['wall_seconds']:.1f} s, {report['documents_per_second'] or 0:,.0f} documents/s",
    ]
    # Where lines were dropped, or a file was not UTF-8: the file and the encoding it was read as.
    noted = [f for f in report.get("files", []) if f.get("malformed") or f.get("encoding") not in (None, "utf-8")]
    for f in noted[:MAX_FILES_NOTED]:
        dropped = f"{f['malformed']:,} malformed records dropped, " if f.get("malformed") else ""
        lines.append(f"  {f['file']}: {dropped}read as {f.get('encoding') or '-'}")
    if len(noted) > MAX_FILES_NOTED:
        lines.append(f"  ... and {len(noted) - MAX_FILES_NOTED} more files (see report.json)")
    return "\n".join(lines)


MAX_FILES_NOTED = 10


EPILOG = """examples:
  xiaolm data prepare stories.jsonl --field story_zh --out data/prepared
  xiaolm data prepare ../shared/data/classic_novels --txt-mode chapter --chapter-regex '第.+回' --out novels
  xiaolm data prepare '宋词/ci.song.*.json' --field paragraphs --to-simplified --out ci
  xiaolm data prepare hf:adam89/TinyStoriesChinese --field story_zh --out tinystories
"""


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_config(PrepareConfig, argv, prog="xiaolm data prepare", positionals={"inputs": "INPUT"},
                          epilog=EPILOG)
    try:
        report = prepare(cfg.inputs, cfg.out, cfg)
    except InputError as exc:
        raise fail(str(exc)) from None
    except (ValueError, ConfigError) as exc:
        raise fail(str(exc)) from None
    if report is None:  # datatrove on Slurm: submitted, finishes later
        return 0
    if not cfg.quiet:
        log(_summary(report))
        for warning in report["warnings"]:
            log(f"warning: {warning}")
        log(f"wrote {cfg.out}/train.jsonl, val.jsonl, report.json, config.yaml")
    if report["documents_kept"] == 0:
        log("xiaolm: error: no documents kept; see report.json")
        return 1
    return 0
