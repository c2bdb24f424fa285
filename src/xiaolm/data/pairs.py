"""Preference pairs in one format, loaded from the layouts people bring (``xiaolm data pairs --data``; on-policy
sampling, ``--policy``, is ``xiaolm.align.onpolicy``), and the training prompts that alignment samples from.

One pair format for every later stage (``xiaolm reward``, ``xiaolm dpo``), one JSON object per line::

    {"prompt": [{"role": "user", "content": "..."}], "chosen": "...", "rejected": "...",
     "source": "file:line", "layout": "llamafactory", ...metadata (constraints, story_id, scores, margin)}

Unpaired, labelled responses (for KTO) have ``"completion"`` and ``"label"`` (true = desirable) instead of
``chosen`` / ``rejected``.

Layouts read by ``--data`` (detected per record; JSON Lines, JSON arrays or one object, as ``xiaolm.data.formats``):

- ``prompt``: ``prompt`` / ``chosen`` / ``rejected`` strings (optional ``system``, and ``history`` as
  ``[[question, answer], ...]``); ``question`` may stand for ``prompt``; ``prompt`` may also be a message list (our
  own format, and TRL's conversational format where ``chosen`` / ``rejected`` are assistant message lists);
- ``llamafactory``: ``conversations`` (``from``/``value`` turns ending with the user's) and ``chosen`` / ``rejected``
  as ``{"from": "gpt", "value": ...}`` (LLaMA-Factory's ``dpo_zh_demo.json``);
- ``medicalgpt``: ``conversations`` with ``chosen`` / ``rejected`` strings; and MedicalGPT's reward files with
  ``question`` / ``response_chosen`` / ``response_rejected`` (``reward_medical_test.json``);
- ``minimind``: ``chosen`` / ``rejected`` as full message lists (``role``/``content``) that share every turn but the
  last assistant answer;
- ``kto``: ``prompt`` + ``completion`` + ``label`` (TRL's unpaired layout).

A malformed record (missing field, wrong type, turns out of order, chosen identical to rejected, different prompts
in the chosen and rejected lists) is counted and reported with its file, line and reason, and skipped.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from xiaolm.utils import log

LAYOUTS = ("prompt", "llamafactory", "medicalgpt", "minimind", "kto")


class PairError(ValueError):
    """A record that does not fit any preference layout; the message is the reason."""


@dataclass
class PairReport:
    path: str
    layouts: dict = field(default_factory=dict)
    pairs: int = 0
    labelled: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self, show: int = 5) -> str:
        kinds = "+".join(self.layouts) or "?"
        lines = [f"{self.path}: {self.pairs} pairs" + (f", {self.labelled} labelled responses" if self.labelled else "")
                 + f" ({kinds}), {self.skipped} malformed skipped"]
        lines += [f"  {p}" for p in self.problems[:show]]
        if len(self.problems) > show:
            lines.append(f"  ... and {len(self.problems) - show} more")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"path": self.path, "layouts": self.layouts, "pairs": self.pairs, "labelled": self.labelled,
                "skipped": self.skipped, "problems": self.problems[:100]}


# ---------------------------------------------------------------------------------------------- record layouts

_KNOWN = {"prompt", "question", "system", "history", "conversations", "messages", "chosen", "rejected",
          "response_chosen", "response_rejected", "completion", "label", "source", "layout"}


def _text(value, what: str) -> str:
    from xiaolm.data.formats import RecordError
    from xiaolm.data.formats import _text as formats_text

    try:
        text = formats_text(value, what)
    except RecordError as exc:
        raise PairError(str(exc)) from None
    if not text.strip():
        raise PairError(f"{what} is empty")
    return text


def _answer_text(value, what: str) -> str:
    """A response given as a string, a ``{from, value}`` / ``{role, content}`` turn, or a one-turn list."""
    if isinstance(value, dict):
        if "value" in value:
            speaker = str(value.get("from", "gpt")).lower()
            if speaker not in ("gpt", "assistant", "chatgpt", "model", "bot"):
                raise PairError(f"{what}.from is {value.get('from')!r}, expected an assistant turn")
            return _text(value["value"], f"{what}.value")
        if "content" in value:
            if value.get("role", "assistant") != "assistant":
                raise PairError(f"{what}.role is {value.get('role')!r}, expected 'assistant'")
            return _text(value["content"], f"{what}.content")
        raise PairError(f"{what} needs 'value' (ShareGPT) or 'content' (OpenAI)")
    if isinstance(value, list):
        if len(value) != 1:
            raise PairError(f"{what} is a list of {len(value)} turns; expected one assistant turn")
        return _answer_text(value[0], f"{what}[0]")
    return _text(value, what)


def _prompt_from_text(rec: dict, key: str) -> list[dict]:
    from xiaolm.data.formats import RecordError, system_and_history

    try:
        messages = system_and_history(rec, _text)
    except RecordError as exc:
        raise PairError(str(exc)) from None
    messages.append({"role": "user", "content": _text(rec[key], f"field '{key}'")})
    return messages


def _prompt_from_turns(rec: dict, key: str) -> list[dict]:
    """Prompt turns from a ShareGPT (``from``/``value``) or OpenAI (``role``/``content``) list."""
    from xiaolm.data.formats import RecordError, from_openai, from_sharegpt

    turns = rec[key]
    if not isinstance(turns, list) or not turns:
        raise PairError(f"field '{key}' must be a non-empty list of turns")
    first = turns[0] if isinstance(turns[0], dict) else {}
    try:
        if "from" in first:
            return from_sharegpt({key: turns, "system": rec.get("system")})
        messages = from_openai({"messages": turns})
    except RecordError as exc:
        raise PairError(str(exc)) from None
    if rec.get("system") and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": _text(rec["system"], "field 'system'")})
    return messages


def _message_list(value, what: str) -> list[dict]:
    from xiaolm.data.formats import RecordError, from_openai, from_sharegpt

    if not isinstance(value, list) or not value:
        raise PairError(f"{what} must be a non-empty list of messages")
    try:
        if isinstance(value[0], dict) and "from" in value[0]:
            return from_sharegpt({"conversations": value})
        return from_openai({"messages": value})
    except RecordError as exc:
        raise PairError(f"{what}: {exc}") from None


def _check_prompt(prompt: list[dict], answer: str) -> list[dict]:
    """Turns must alternate (user first, after an optional system message) and end with the user's question."""
    from xiaolm.data.formats import RecordError, validate_messages

    if not prompt or prompt[-1]["role"] != "user":
        raise PairError("the prompt must end with a user turn")
    try:
        validate_messages(prompt + [{"role": "assistant", "content": answer}], require_answer=True)
    except RecordError as exc:
        raise PairError(str(exc)) from None
    return prompt


def convert_pair_record(rec: object) -> tuple[str, dict, str]:
    """One record -> ``(kind, normalised record, layout)``; ``kind`` is ``pair`` or ``labelled``.

    Raises PairError with the reason for a record that fits no layout."""
    if not isinstance(rec, dict):
        raise PairError(f"a record must be a JSON object, got {type(rec).__name__}")
    meta = {k: v for k, v in rec.items() if k not in _KNOWN}
    if "completion" in rec and "label" in rec and "chosen" not in rec:
        if not isinstance(rec["label"], bool):
            raise PairError(f"'label' is {rec['label']!r}, expected true or false")
        prompt = (_message_list(rec["prompt"], "'prompt'") if isinstance(rec.get("prompt"), list)
                  else _prompt_from_text(rec, "prompt") if "prompt" in rec else None)
        if prompt is None:
            raise PairError("missing field 'prompt'")
        completion = _answer_text(rec["completion"], "'completion'")
        return "labelled", {"prompt": _check_prompt(prompt, completion), "completion": completion,
                            "label": rec["label"], **meta}, "kto"
    if "response_chosen" in rec or "response_rejected" in rec:  # MedicalGPT reward / DPO files
        for key in ("question", "response_chosen", "response_rejected"):
            if key not in rec:
                raise PairError(f"missing field '{key}'")
        prompt = _prompt_from_text(rec, "question")
        chosen = _text(rec["response_chosen"], "'response_chosen'")
        rejected = _text(rec["response_rejected"], "'response_rejected'")
        layout = "medicalgpt"
    else:
        for key in ("chosen", "rejected"):
            if key not in rec:
                raise PairError(f"missing field '{key}' (known layouts: {', '.join(LAYOUTS)})")
        c, r = rec["chosen"], rec["rejected"]
        if isinstance(c, list) and len(c) > 1 and not ("prompt" in rec or "conversations" in rec):
            # minimind: whole conversations that differ only in the last answer
            cm, rm = _message_list(c, "'chosen'"), _message_list(r, "'rejected'")
            if cm[-1]["role"] != "assistant" or rm[-1]["role"] != "assistant":
                raise PairError("'chosen' and 'rejected' must end with an assistant turn")
            if cm[:-1] != rm[:-1]:
                raise PairError("'chosen' and 'rejected' have different prompts (every turn but the last must match)")
            prompt, chosen, rejected, layout = cm[:-1], cm[-1]["content"], rm[-1]["content"], "minimind"
            if not chosen.strip() or not rejected.strip():
                raise PairError("an empty answer in 'chosen' or 'rejected'")
        else:
            chosen, rejected = _answer_text(c, "'chosen'"), _answer_text(r, "'rejected'")
            if "conversations" in rec or "messages" in rec:
                key = "conversations" if "conversations" in rec else "messages"
                prompt = _prompt_from_turns(rec, key)
                layout = "llamafactory" if isinstance(c, dict) else "medicalgpt"
            elif isinstance(rec.get("prompt"), list):
                prompt, layout = _message_list(rec["prompt"], "'prompt'"), "prompt"
            elif "prompt" in rec or "question" in rec:
                prompt, layout = _prompt_from_text(rec, "prompt" if "prompt" in rec else "question"), "prompt"
            else:
                raise PairError("no prompt: expected 'prompt', 'question', 'conversations' or 'messages'")
    if chosen.strip() == rejected.strip():
        raise PairError("'chosen' and 'rejected' are identical (no preference to learn)")
    prompt = _check_prompt(prompt, chosen)
    return "pair", {"prompt": prompt, "chosen": chosen, "rejected": rejected, **meta}, layout


def load_preference_file(path: str | Path) -> tuple[list[dict], list[dict], PairReport]:
    """Pairs and labelled responses of one file, normalised, with a report of what was skipped and why."""
    from xiaolm.data.formats import iter_json_records

    path = Path(path)
    report = PairReport(path=str(path))
    pairs, labelled = [], []
    for line, rec, error in iter_json_records(path):
        where = f"{path}:{line}"
        if error is not None:
            report.skipped += 1
            report.problems.append(f"{where}: {error}")
            continue
        try:
            kind, norm, layout = convert_pair_record(rec)
        except PairError as exc:
            report.skipped += 1
            report.problems.append(f"{where}: {exc}")
            continue
        norm["source"] = rec.get("source") or where
        norm["layout"] = rec.get("layout") or layout
        report.layouts[layout] = report.layouts.get(layout, 0) + 1
        (pairs if kind == "pair" else labelled).append(norm)
    report.pairs, report.labelled = len(pairs), len(labelled)
    return pairs, labelled, report


def expand_pair_paths(paths: list[str]) -> list[Path]:
    """Preference files named directly or inside directories (every .json/.jsonl there but xiaolm's reports)."""
    from xiaolm.data.formats import expand_paths

    return expand_paths(paths, split=None, skip_reports=True)


def load_preferences(paths: list[str]) -> tuple[list[dict], list[dict], list[PairReport]]:
    """Pairs, labelled responses and per-file reports of several files (in order)."""
    pairs, labelled, reports = [], [], []
    for f in expand_pair_paths(paths):
        p, lab, r = load_preference_file(f)
        pairs += p
        labelled += lab
        reports.append(r)
    return pairs, labelled, reports


def prompt_key(prompt: list[dict]) -> str:
    """A stable text key of a prompt (for hash splits and held-out checks)."""
    return json.dumps(prompt, ensure_ascii=False, sort_keys=True)


# ---------------------------------------------------------------------------------------------- training prompts


@dataclass
class PromptSet:
    prompts: list[dict]  # {"prompt": messages, "constraints", "story_id", "reference", "where"}
    excluded_heldout: int = 0
    files: list = field(default_factory=list)
    heldout_files: list = field(default_factory=list)


def _heldout_beside(paths: list[str]) -> list[Path]:
    found = []
    for p in paths:
        path = Path(p)
        cand = path / "heldout.jsonl" if path.is_dir() else path.parent / "heldout.jsonl"
        if cand.is_file() and cand.resolve() != path.resolve():
            found.append(cand)
    return list(dict.fromkeys(found))


def load_prompt_set(paths: list[str], heldout: Optional[list[str]] = None, limit: Optional[int] = None) -> PromptSet:
    """Training prompts (with their constraints) from instruction data, never one whose story or prompt text is in
    the held-out files (``heldout``; default: a ``heldout.jsonl`` beside the prompts)."""
    from xiaolm.data.formats import expand_paths, load_conversations

    files = expand_paths(paths, "train")
    held_files = [Path(p) for p in heldout] if heldout else _heldout_beside(paths)
    for p in held_files:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such file")
    held_ids, held_texts = set(), set()
    if held_files:
        held, _ = load_conversations(held_files, require_answer=False)
        for c in held:
            if c.meta.get("story_id"):
                held_ids.add(c.meta["story_id"])
            held_texts.add(prompt_key(c.prompt_messages))
    convs, reports = load_conversations(files, require_answer=False)
    for r in reports:
        if r.skipped:
            log(r.summary())
    out = PromptSet(prompts=[], files=[str(f) for f in files], heldout_files=[str(f) for f in held_files])
    for c in convs:
        prompt = c.prompt_messages
        if not prompt or prompt[-1]["role"] != "user":
            continue
        if (c.meta.get("story_id") and c.meta["story_id"] in held_ids) or prompt_key(prompt) in held_texts:
            out.excluded_heldout += 1
            continue
        out.prompts.append({"prompt": prompt, "constraints": c.meta.get("constraints") or {},
                            "story_id": c.meta.get("story_id"), "reference": c.reference, "where": c.where})
        if limit is not None and len(out.prompts) >= limit:
            break
    return out
