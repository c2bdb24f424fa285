"""``xiaolm chat``: talk to a chat model in the terminal.

Answers stream as they are generated (``StreamDecoder``: never half a character). The conversation so far is sent
with every message, rendered with the chat template; when it no longer fits the context window together with room
for the answer, the oldest turns are left out first (the system message always stays) and a note says how many.
Commands: ``/reset`` (forget the conversation), ``/system <text>`` (set the system message; ``/system`` alone clears
it), ``/save <file>`` (write the conversation as JSON: OpenAI messages), ``/help``, ``/quit``. Works on a terminal
(with line editing) and on piped stdin, one message per line.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from xiaolm.config import opt, parse_config
from xiaolm.infer.generate import SamplingConfig, chat_prompt_ids, load_sampling_model

HELP = ("commands: /reset  forget the conversation | /system <text>  set the system message (/system alone clears "
        "it) | /save <file>  write the conversation as JSON | /help | /quit")


def _chat_sampling() -> SamplingConfig:
    return SamplingConfig(max_new_tokens=256, temperature=0.7, top_p=0.9, repetition_penalty=1.1)


@dataclass
class ChatConfig:
    run: str = opt(None, "the chat model: RUNDIR (xiaolm sft), checkpoint, quantised or Hugging Face directory")
    system: Optional[str] = opt(None, "system message to start with")
    context: Optional[int] = opt(None, "context window in tokens (default: the model's)")
    device: str = opt("auto", "auto, cpu, cuda or mps")
    checkpoint: str = opt("latest", "which checkpoint of a RUNDIR: latest or best")
    sampling: SamplingConfig = field(default_factory=_chat_sampling)


class ChatSession:
    """The conversation state and the rule for fitting it into the context window."""

    def __init__(self, model, tokenizer, sampling: SamplingConfig, context: Optional[int] = None,
                 system: Optional[str] = None):
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.context = context or model.config.max_position_embeddings
        self.system = system
        self.turns: list[dict] = []  # user / assistant messages, oldest first
        self.dropped = 0  # turns left out of the last prompt

    @property
    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def answer_budget(self) -> int:
        """Tokens kept free for the answer: max_new_tokens, but never more than half the window."""
        return min(self.sampling.max_new_tokens, self.context // 2)

    def prompt_ids(self) -> tuple[list[int], int]:
        """Prompt for the next answer and how many of the oldest turns had to be left out to fit the window.

        Turns are dropped from the oldest, in user/assistant pairs, so the prompt always starts with a user turn.
        Raises ValueError when even the newest user message alone does not fit."""
        limit = self.context - self.answer_budget()
        head = [{"role": "system", "content": self.system}] if self.system else []
        start = 0
        while True:
            msgs = head + self.turns[start:]
            ids = chat_prompt_ids(self.tokenizer, msgs)
            if len(ids) <= limit:
                return ids, start
            if start >= len(self.turns) - 1:
                raise ValueError(f"this message needs {len(ids)} tokens but the context window leaves {limit} "
                                 f"for the prompt ({self.context} minus {self.answer_budget()} for the answer)")
            start += 2

    def reply(self, text: str, write: Callable[[str], None], note: Callable[[str], None]) -> Optional[str]:
        """Add a user message, stream the answer through ``write``; returns the answer (None if it did not fit)."""
        from xiaolm.infer.generate import dropped_note, generate_samples

        self.turns.append({"role": "user", "content": text})
        try:
            ids, dropped = self.prompt_ids()
        except ValueError as exc:
            self.turns.pop()
            note(f"[{exc}; say it in fewer words]")
            return None
        if dropped != self.dropped and dropped:
            note(f"[the conversation is longer than the {self.context}-token context window: the {dropped} oldest "
                 f"turn(s) are left out of what the model sees]")
        self.dropped = dropped
        try:
            result = generate_samples(self.model, self.tokenizer, [""], self.sampling, prompt_ids=[ids],
                                      stream=lambda _row, delta: write(delta))[0]
        except KeyboardInterrupt:
            note("\n[interrupted]")
            self.turns.pop()
            return None
        answer = result.text
        if dropped_note([result]):
            note("\n" + dropped_note([result]))
        self.turns.append({"role": "assistant", "content": answer})
        return answer

    def reset(self) -> None:
        self.turns = []
        self.dropped = 0

    def save(self, path: str | Path) -> Path:
        from xiaolm.utils import atomic_write_json

        path = Path(path)
        atomic_write_json(path, {"messages": self.messages})
        return path


def run_chat(session: ChatSession, stdin=None, stdout=None, stderr=None, interactive: Optional[bool] = None) -> int:
    """The read-answer loop over ``stdin`` until EOF or /quit."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    interactive = stdin.isatty() if interactive is None else interactive
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    def note(text: str) -> None:
        stderr.write(text + "\n")
        stderr.flush()

    if interactive:
        note(f"xiaolm chat: {session.context}-token context. {HELP}")
    while True:
        try:
            if interactive and stdin is sys.stdin:
                line = input("你> ") + "\n"  # input() drops the newline; "" would look like end of input
            else:
                if interactive:
                    write("你> ")
                line = stdin.readline()
        except (EOFError, KeyboardInterrupt):
            line = ""
        if line == "":  # end of input (Ctrl-D, or the end of piped stdin)
            if interactive:
                write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            arg = arg.strip()
            if cmd in ("/quit", "/exit", "/q"):
                return 0
            if cmd == "/reset":
                session.reset()
                note("[conversation cleared]")
            elif cmd == "/system":
                session.system = arg or None
                note(f"[system message set: {arg}]" if arg else "[system message cleared]")
            elif cmd == "/save":
                if not arg:
                    note("[usage: /save <file>]")
                    continue
                try:
                    note(f"[saved {len(session.messages)} messages to {session.save(arg)}]")
                except OSError as exc:
                    note(f"[cannot save to {arg}: {exc.strerror}]")
            elif cmd == "/help":
                note(HELP)
            else:
                note(f"[unknown command {cmd}] {HELP}")
            continue
        if interactive:
            write("模型> ")
        session.reply(text, write, note)
        write("\n")


def main(argv: list[str]) -> int:
    from xiaolm.utils import fail

    cfg, _ = parse_config(
        ChatConfig, argv, "xiaolm chat",
        "Chat with a model in the terminal; answers stream as they are written.\n" + HELP.replace(" | ", "\n  "),
        positionals={"run": "RUNDIR"},
    )
    model, tokenizer = load_sampling_model(cfg)
    if getattr(tokenizer, "im_end_id", None) is None:
        raise fail(f"{cfg.run}: the tokenizer has no chat template markers")
    context = cfg.context or model.config.max_position_embeddings
    if context > model.config.max_position_embeddings:
        raise fail(f"--context {context} exceeds the model's {model.config.max_position_embeddings} positions")
    if context < 16:
        raise fail("--context must be at least 16 tokens")
    session = ChatSession(model, tokenizer, cfg.sampling, context, cfg.system)
    return run_chat(session)
