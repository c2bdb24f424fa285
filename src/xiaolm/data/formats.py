"""Loaders for the chat / instruction layouts people bring, into one shape: a list of OpenAI-style messages.

Layouts (detected per record, or forced with ``fmt``):

- ``alpaca``: ``{"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}``
- ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}], "system"?}``
- ``openai``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}], ...}``; any other fields
  (our instruction data keeps ``constraints`` and ``story_id`` there) are kept as ``Conversation.meta``.
- tool calls, tool turns and reasoning (glaive ShareGPT ``function_call``/``observation``, OpenAI ``tool_calls``/
  ``tool``, ``reasoning_content``, the DeepSeek-R1 ``reasoning`` layout) are read by ``xiaolm.data.toolformats``;
  ``tools`` becomes ``Conversation.meta["tools"]`` (OpenAI schemas) and ``Conversation.tools``.

Files may be JSON Lines, a JSON array (pretty-printed or not), or one JSON object; the extension does not decide
(``Belle_open_source_1k.json`` is JSON Lines). CSV, Parquet and Arrow files and ``datasets`` ``save_to_disk``
directories are read through the shared reader (``xiaolm.data.readers.iter_raw_records``), their rows named
``file:row``. A malformed record is reported with its file, line and reason and
skipped; it never stops the load. A conversation whose last user turn has no answer is kept with that turn trimmed,
and that is reported too.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from xiaolm.data.chatrecord import SHAREGPT_ROLES, RecordError, text_field

FORMATS = ("auto", "alpaca", "sharegpt", "openai", "reasoning")
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".gz")  # what a directory of data contributes

_SHAREGPT_ROLES = SHAREGPT_ROLES
_OPENAI_ROLES = ("system", "user", "assistant")


@dataclass
class Conversation:
    """One chat sample: ``messages`` alternate user/assistant after an optional system message."""

    messages: list[dict]
    where: str  # "path:line", for messages about this sample
    meta: dict = field(default_factory=dict)

    @property
    def tools(self) -> Optional[list]:
        """The function schemas offered in this conversation (OpenAI layout), if any."""
        return self.meta.get("tools") or None

    @property
    def prompt_messages(self) -> list[dict]:
        """Everything before the final assistant answer (the answer's prompt at evaluation)."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            return self.messages[:-1]
        return list(self.messages)

    @property
    def reference(self) -> Optional[str]:
        """The final assistant answer, if the sample has one."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            return self.messages[-1]["content"]
        return None


@dataclass
class Problem:
    where: str  # "path:line"
    reason: str
    action: str = "skipped"  # or "trimmed"

    def __str__(self) -> str:
        return f"{self.where}: {self.reason} ({self.action})"


@dataclass
class LoadReport:
    path: str
    format: str = "?"
    loaded: int = 0
    skipped: int = 0
    trimmed: int = 0
    problems: list[Problem] = field(default_factory=list)

    def summary(self, show: int = 5) -> str:
        lines = [f"{self.path}: {self.loaded} conversations ({self.format}), {self.skipped} malformed skipped"
                 + (f", {self.trimmed} trimmed" if self.trimmed else "")]
        for p in self.problems[:show]:
            lines.append(f"  {p}")
        if len(self.problems) > show:
            lines.append(f"  ... and {len(self.problems) - show} more")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"path": self.path, "format": self.format, "loaded": self.loaded, "skipped": self.skipped,
                "trimmed": self.trimmed, "problems": [str(p) for p in self.problems[:100]]}


# ---------------------------------------------------------------------------------------------- reading


def iter_json_records(path: str | Path) -> Iterator[tuple[int, object, Optional[str]]]:
    """Yield ``(line, record, error)`` for every record of a JSON Lines file, a JSON array or a single object.

    ``error`` is a reason string for a record that could not be parsed (then ``record`` is None). A JSON array with a
    syntax error yields the records before the error, then one error at the line where parsing stopped. CSV,
    Parquet, Arrow files and ``save_to_disk`` directories: their rows, ``line`` being the CSV line or the row.
    """
    from xiaolm.data.readers import ROW_FORMATS, InputError, _format_of, is_saved_dataset, iter_raw_records

    path = Path(path)
    if is_saved_dataset(path) or _format_of(str(path))[0] in ROW_FORMATS:
        try:
            yield from iter_raw_records(path)
        except InputError as exc:
            yield 0, None, str(exc)
        return
    if path.suffix == ".gz":
        import gzip

        with gzip.open(path, "rt", encoding="utf-8-sig") as fh:
            text = fh.read()
    else:
        text = path.read_text(encoding="utf-8-sig")
    stripped = text.lstrip()
    if stripped.startswith("["):
        yield from _iter_array(text)
        return
    if stripped.startswith("{"):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # several objects: JSON Lines
        if isinstance(whole, dict):
            line = text[: len(text) - len(stripped)].count("\n") + 1
            yield line, whole, None
            return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line), None
        except json.JSONDecodeError as exc:
            yield lineno, None, f"not valid JSON ({exc.msg} at column {exc.colno})"


def _iter_array(text: str) -> Iterator[tuple[int, object, Optional[str]]]:
    """Walk a top-level JSON array element by element, tracking the line each element starts on."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    line = text.count("\n", 0, pos) + 1
    n = len(text)

    def skip_ws(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    i = skip_ws(pos)
    line += text.count("\n", pos, i)
    if i < n and text[i] == "]":
        return
    while i < n:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            yield exc.lineno, None, f"not valid JSON ({exc.msg} at column {exc.colno}); the rest of the file is unread"
            return
        yield line, obj, None
        j = skip_ws(end)
        if j < n and text[j] == ",":
            j = skip_ws(j + 1)
        elif j < n and text[j] == "]":
            return
        else:
            where = text.count("\n", 0, j) + 1
            yield where, None, "not valid JSON (expected ',' or ']' between array elements); the rest is unread"
            return
        line += text.count("\n", i, j)
        i = j


# ---------------------------------------------------------------------------------------------- layouts


def detect_format(record: object) -> Optional[str]:
    """``alpaca``, ``sharegpt`` or ``openai`` by the record's keys; None when none fits."""
    from xiaolm.data.toolformats import is_reasoning_record

    if not isinstance(record, dict):
        return None
    if is_reasoning_record(record):
        return "reasoning"
    if isinstance(record.get("messages"), list):
        first = next((m for m in record["messages"] if isinstance(m, dict)), {})
        return "sharegpt" if "from" in first and "role" not in first else "openai"
    if isinstance(record.get("conversations"), list):
        first = next((m for m in record["conversations"] if isinstance(m, dict)), {})
        return "openai" if "role" in first and "from" not in first else "sharegpt"
    if "instruction" in record or "output" in record:
        return "alpaca"
    return None


def system_and_history(rec: dict, text=None) -> list[dict]:
    """The messages before the last question of an Alpaca-style record: optional ``system``, then ``history`` as
    [question, answer] pairs. ``text`` converts each value (default: this module's checked text)."""
    text = text or _text
    messages = []
    if rec.get("system"):
        messages.append({"role": "system", "content": text(rec["system"], "field 'system'")})
    for k, turn in enumerate(rec.get("history") or []):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
            raise RecordError(f"'history[{k}]' is not a [question, answer] pair")
        messages.append({"role": "user", "content": text(turn[0], f"'history[{k}][0]'")})
        messages.append({"role": "assistant", "content": text(turn[1], f"'history[{k}][1]'")})
    return messages


_text = text_field


def from_alpaca(rec: dict) -> list[dict]:
    for key in ("instruction", "output"):
        if key not in rec:
            raise RecordError(f"missing field '{key}'")
    instruction = _text(rec["instruction"], "field 'instruction'").strip()
    extra = _text(rec.get("input") or "", "field 'input'").strip()
    output = _text(rec["output"], "field 'output'")
    if not instruction and not extra:
        raise RecordError("empty 'instruction' and 'input'")
    if not output.strip():
        raise RecordError("empty 'output'")
    messages = system_and_history(rec)
    messages.append({"role": "user", "content": f"{instruction}\n{extra}" if instruction and extra else instruction or extra})
    messages.append({"role": "assistant", "content": output})
    return messages


def _conversation(rec: dict, keys: tuple[str, str], speaker: str, text: str, role_of: Callable[[object, str], str],
                  first: Callable[[], list[dict]]) -> list[dict]:
    """``first()`` (called once the list is found, so that a missing list is reported before anything else)
    followed by the turns of a ShareGPT or OpenAI record: the list under the first of ``keys`` present (else the
    second); ``role_of(value, where)`` maps a turn's ``speaker`` field to a role or raises RecordError."""
    key = keys[0] if keys[0] in rec else keys[1]
    turns = rec.get(key)
    if not isinstance(turns, list):
        raise RecordError(f"missing field '{keys[0]}' (a list)")
    messages = first()
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or speaker not in turn or text not in turn:
            raise RecordError(f"'{key}[{k}]' needs '{speaker}' and '{text}'")
        role = role_of(turn[speaker], f"'{key}[{k}].{speaker}'")
        messages.append({"role": role, "content": _text(turn[text], f"'{key}[{k}].{text}'")})
    return messages


def _sharegpt_role(speaker: object, where: str) -> str:
    role = _SHAREGPT_ROLES.get(str(speaker).lower())
    if role is None:
        raise RecordError(f"{where} is {speaker!r} (tool turns are not supported)")
    return role


def _openai_role(role: object, where: str) -> str:
    if role not in _OPENAI_ROLES:
        raise RecordError(f"{where} is {role!r}, expected one of {list(_OPENAI_ROLES)}")
    return role  # type: ignore[return-value]


def from_sharegpt(rec: dict) -> list[dict]:
    def system() -> list[dict]:
        return [{"role": "system", "content": _text(rec["system"], "field 'system'")}] if rec.get("system") else []

    return _conversation(rec, ("conversations", "messages"), "from", "value", _sharegpt_role, system)


def from_openai(rec: dict) -> list[dict]:
    return _conversation(rec, ("messages", "conversations"), "role", "content", _openai_role, list)


_CONVERTERS = {"alpaca": from_alpaca, "sharegpt": from_sharegpt, "openai": from_openai}


def validate_messages(messages: list[dict], require_answer: bool = True) -> tuple[list[dict], Optional[str]]:
    """Check the turn structure. Returns ``(messages, note)``; ``note`` says what was trimmed, if anything.

    Rules: at most one system message and only first; then user and assistant alternate, starting with user; no
    empty turn. A final user turn with no answer is trimmed when ``require_answer``; a conversation left without any
    assistant turn is an error.
    """
    if not messages:
        raise RecordError("no messages")
    body = messages
    if messages[0]["role"] == "system":
        body = messages[1:]
    for k, m in enumerate(body):
        if m["role"] == "system":
            raise RecordError(f"a system message at turn {k + 1}; only the first message may be one")
        want = "user" if k % 2 == 0 else "assistant"
        if m["role"] != want:
            raise RecordError(f"turn {k + 1} is '{m['role']}', expected '{want}' (turns must alternate, user first)")
        if not m["content"].strip():
            raise RecordError(f"turn {k + 1} ('{m['role']}') is empty")
    if not body:
        raise RecordError("no user turn")
    note = None
    if require_answer and body[-1]["role"] == "user":
        if len(body) == 1:
            raise RecordError("no assistant answer")
        messages = messages[:-1]
        note = "last user turn has no answer"
    return messages, note


def convert_record(rec: object, fmt: str = "auto", require_answer: bool = True) -> tuple[list[dict], Optional[str], str]:
    """One record -> ``(messages, note, format)``; raises RecordError with the reason."""
    if not isinstance(rec, dict):
        raise RecordError(f"a record must be a JSON object, got {type(rec).__name__}")
    from xiaolm.data import toolformats

    layout = detect_format(rec) if fmt == "auto" else fmt
    if layout is None:
        raise RecordError(f"no known layout (keys {sorted(rec)[:6]}); expected alpaca, sharegpt or openai fields")
    if layout == "reasoning":
        messages = toolformats.from_reasoning(rec)
    elif layout in ("sharegpt", "openai") and toolformats.is_tool_record(rec):
        messages = (toolformats.from_sharegpt_tools if layout == "sharegpt" else toolformats.from_openai_tools)(rec)
        messages, note = toolformats.validate_tool_messages(messages, require_answer)
        return messages, note, layout
    else:
        messages = _CONVERTERS[layout](rec)
    messages, note = validate_messages(messages, require_answer)
    return messages, note, layout


_KNOWN_KEYS = {"messages", "conversations", "instruction", "input", "output", "system", "history"}


def load_file(path: str | Path, fmt: str = "auto", require_answer: bool = True) -> tuple[list[Conversation], LoadReport]:
    """All conversations of one file, and a report of what was skipped or trimmed and why."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    report = LoadReport(path=str(path))
    out: list[Conversation] = []
    seen_formats: dict[str, int] = {}
    for line, rec, error in iter_json_records(path):
        where = f"{path}:{line}"
        if error is not None:
            report.skipped += 1
            report.problems.append(Problem(where, error))
            continue
        try:
            messages, note, layout = convert_record(rec, fmt, require_answer)
        except RecordError as exc:
            report.skipped += 1
            report.problems.append(Problem(where, str(exc)))
            continue
        if note:
            report.trimmed += 1
            report.problems.append(Problem(where, note, "trimmed"))
        seen_formats[layout] = seen_formats.get(layout, 0) + 1
        meta = {k: v for k, v in rec.items() if k not in _KNOWN_KEYS}
        if "tools" in meta:  # schemas in OpenAI layout, for the system turn (glaive keeps them as a JSON string)
            from xiaolm.data.toolformats import parse_tools

            try:
                meta["tools"] = parse_tools(meta["tools"])
            except RecordError as exc:
                report.skipped += 1
                report.problems.append(Problem(where, str(exc)))
                continue
        out.append(Conversation(messages, where, meta))
    report.loaded = len(out)
    report.format = "+".join(sorted(seen_formats, key=lambda k: -seen_formats[k])) or (fmt if fmt != "auto" else "?")
    return out, report


def expand_paths(paths: list[str], split: Optional[str] = "train", skip_reports: bool = False) -> list[Path]:
    """Files named directly, or inside directories. An instruction-data directory (``xiaolm data instruct``) gives
    its ``{split}.jsonl`` (unless ``split`` is None); a ``save_to_disk`` directory is one input; any other directory
    gives its data files (``DATA_SUFFIXES``) and saved datasets, less the ``*.report.json`` files xiaolm writes
    beside its outputs when ``skip_reports``."""
    from xiaolm.data.readers import is_saved_dataset

    files: list[Path] = []
    for p in paths:
        path = Path(p)
        if is_saved_dataset(path):  # read as a whole (iter_json_records), never its state.json
            files.append(path)
        elif path.is_dir():
            own = path / f"{split}.jsonl"
            if split is not None and own.is_file():
                files.append(own)
                continue
            found = sorted(q for q in path.iterdir()
                           if (q.is_file() and q.name.endswith(DATA_SUFFIXES) or is_saved_dataset(q))
                           and not (skip_reports and q.name.endswith(".report.json")))
            if not found:
                raise FileNotFoundError(f"{path}: no data files in this directory "
                                        f"({', '.join(DATA_SUFFIXES)} or a save_to_disk directory)")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
    return files


def load_conversations(paths: list[str | Path], fmt: str = "auto", require_answer: bool = True,
                       ) -> tuple[list[Conversation], list[LoadReport]]:
    """Conversations of several files (in order) and one report per file."""
    convs: list[Conversation] = []
    reports = []
    for p in paths:
        c, r = load_file(p, fmt, require_answer)
        convs.extend(c)
        reports.append(r)
    return convs, reports
