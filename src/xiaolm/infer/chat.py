"""``xiaolm chat``: talk to a chat model in the terminal.

Answers stream as they are generated (``StreamDecoder``: never half a character). The conversation so far is sent
with every message, rendered with the chat template; when it no longer fits the context window together with room
for the answer, the oldest turns are left out first (the system message always stays) and a note says how many.
Commands: ``/reset`` (forget the conversation), ``/system <text>`` (set the system message; ``/system`` alone clears
it), ``/think on|off`` (the thinking switch, ``enable_thinking``), ``/save <file>`` (write the conversation as JSON:
OpenAI messages), ``/help``, ``/quit``. Works on a terminal (with line editing) and on piped stdin, one message per
line.

Thinking and tools (``xiaolm.tokenizer.chat``'s format): a ``<think>`` block is shown dimmed (on a terminal), and
a ``<tool_call>`` is run (``infer/chat_tools.py``: the built-in tools, ``--builtin-tools`` offers them in the
prompt, and the user's own functions from ``--tools FILE.py``, in the sandbox); the call and its result are shown,
the result goes back to the model as a ``tool`` turn, and the model goes on, up to ``--max-tool-rounds`` times.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from xiaolm.config import opt, parse_config
from xiaolm.infer.generate import SamplingConfig, chat_prompt_ids, load_sampling_model

HELP = ("commands: /reset  forget the conversation | /system <text>  set the system message (/system alone clears "
        "it) | /think on|off  let the model think first, or not | /save <file>  write the conversation as JSON | "
        "/help | /quit")
DIM, RESET = "\x1b[2m", "\x1b[0m"  # thinking is shown dimmed on a terminal


def _chat_sampling() -> SamplingConfig:
    return SamplingConfig(max_new_tokens=256, temperature=0.7, top_p=0.9, repetition_penalty=1.1)


@dataclass
class ChatConfig:
    run: str = opt(None, "the chat model: RUNDIR (xiaolm sft), checkpoint, quantised or Hugging Face directory")
    system: Optional[str] = opt(None, "system message to start with")
    context: Optional[int] = opt(None, "context window in tokens (default: the model's)")
    device: str = opt("auto", "auto, cpu, cuda or mps")
    checkpoint: str = opt("latest", "which checkpoint of a RUNDIR: latest or best")
    tools: list[str] = opt([], "Python files whose public functions the model may call (schema from each "
                               "function's signature and docstring; run in the sandbox)")
    builtin_tools: bool = opt(False, "offer the built-in tools (calculator, weekday, date_add, convert_unit, "
                                     "city_info) in the prompt; calls to them are run either way")
    think: Optional[bool] = opt(None, "start with thinking on or off (default: as the model was trained)")
    max_tool_rounds: int = opt(4, "tool calls answered in a row before the model must answer")
    sampling: SamplingConfig = field(default_factory=_chat_sampling)


class ChatSession:
    """The conversation state and the rule for fitting it into the context window."""

    def __init__(self, model, tokenizer, sampling: SamplingConfig, context: Optional[int] = None,
                 system: Optional[str] = None, tools=None, thinking: Optional[bool] = None, max_tool_rounds: int = 4):
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.context = context or model.config.max_position_embeddings
        self.system = system
        self.tools = tools  # xiaolm.infer.chat_tools.ToolBox, or None: calls are not run
        self.thinking = thinking  # enable_thinking: None (as trained), True, False
        self.max_tool_rounds = max_tool_rounds
        self.turns: list[dict] = []  # user / assistant / tool messages, oldest first
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

        Turns are dropped from the oldest, a user turn and what answered it at a time, so the prompt always starts
        with a user turn. Raises ValueError when even the newest user message alone does not fit."""
        limit = self.context - self.answer_budget()
        head = [{"role": "system", "content": self.system}] if self.system else []
        starts = [k for k, m in enumerate(self.turns) if m["role"] == "user"] or [0]
        for start in starts:
            msgs = head + self.turns[start:]
            if self.tools is None and self.thinking is None:
                ids = chat_prompt_ids(self.tokenizer, msgs)
            else:
                from xiaolm.tokenizer.chat import prompt_ids

                ids = prompt_ids(self.tokenizer, msgs, tools=self.tools.schemas if self.tools else None,
                                 enable_thinking=self.thinking)
            if len(ids) <= limit:
                return ids, start
        raise ValueError(f"this message needs {len(ids)} tokens but the context window leaves {limit} "
                         f"for the prompt ({self.context} minus {self.answer_budget()} for the answer)")

    def reply(self, text: str, write: Callable[[str], None], note: Callable[[str], None],
              think: Optional[Callable[[str], None]] = None) -> Optional[str]:
        """Add a user message, stream the answer through ``write`` (its thinking through ``think``), run the tools
        it calls (each call and result shown through ``note``) and let it go on; returns the final answer (None if
        the message did not fit)."""
        self.turns.append({"role": "user", "content": text})
        first = len(self.turns) - 1
        for _round in range(self.max_tool_rounds + 1):
            message = self._answer(write, note, think or write)
            if message is None:
                del self.turns[first:]
                return None
            self.turns.append(message)
            if not message.get("tool_calls") or self.tools is None:
                return message["content"]
            for call in message["tool_calls"]:
                fn = call["function"]
                note(f"[调用 {fn['name']}({fn['arguments']})]")
                result = self.tools.run(fn["name"], fn["arguments"])
                note(f"[结果 {result}]")
                self.turns.append({"role": "tool", "tool_call_id": call["id"], "content": result})
        note(f"[{self.max_tool_rounds} rounds of tool calls in a row; the model's turn ends here]")
        return self.turns[-1].get("content", "")

    def _answer(self, write, note, think) -> Optional[dict]:
        """One assistant turn, streamed and taken apart (reasoning, content, tool calls); None if it did not fit or
        was interrupted."""
        from xiaolm.infer.generate import dropped_note, generate_samples
        from xiaolm.infer.toolstream import ToolStreamParser, marker_ids

        try:
            ids, dropped = self.prompt_ids()
        except ValueError as exc:
            note(f"[{exc}; say it in fewer words]")
            return None
        if dropped != self.dropped and dropped:
            note(f"[the conversation is longer than the {self.context}-token context window: the {dropped} oldest "
                 f"turn(s) are left out of what the model sees]")
        self.dropped = dropped
        parser = ToolStreamParser(parse_tools=self.tools is not None)

        def show(delta) -> None:
            if delta.reasoning:
                think(delta.reasoning)
            if delta.content:
                write(delta.content)

        try:
            result = generate_samples(self.model, self.tokenizer, [""], self.sampling, prompt_ids=[ids],
                                      stream=lambda _row, text: show(parser.push(text)),
                                      keep_ids=marker_ids(self.tokenizer))[0]
        except KeyboardInterrupt:
            note("\n[interrupted]")
            return None
        show(parser.finish())
        if dropped_note([result]):
            note("\n" + dropped_note([result]))
        parsed = parser.result()
        for error in parsed.errors:
            note(f"[{error}]")
        message = {"role": "assistant", "content": parsed.content or ""}
        if parsed.reasoning is not None:
            message["reasoning_content"] = parsed.reasoning
        if parsed.tool_calls:
            message["tool_calls"] = [c.openai() for c in parsed.tool_calls]
        return message

    def set_thinking(self, value: Optional[bool]) -> None:
        self.thinking = value

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

    def think(text: str) -> None:  # the model's thinking: dimmed on a terminal
        write(f"{DIM}{text}{RESET}" if interactive else text)

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
            elif cmd == "/think":
                if arg not in ("on", "off"):
                    note("[usage: /think on|off]")
                    continue
                session.set_thinking(arg == "on")
                note(f"[thinking {arg}]")
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
        session.reply(text, write, note, think)
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
    if cfg.max_tool_rounds < 0:
        raise fail(f"--max-tool-rounds must be 0 or more, got {cfg.max_tool_rounds}")
    tools = None
    if cfg.tools or cfg.builtin_tools or getattr(tokenizer, "has_markers", False):
        from xiaolm.infer.chat_tools import ToolBox

        try:
            tools = ToolBox(builtin=cfg.builtin_tools, files=cfg.tools)
        except ValueError as exc:
            raise fail(f"--tools {exc}")
    session = ChatSession(model, tokenizer, cfg.sampling, context, cfg.system, tools=tools, thinking=cfg.think,
                          max_tool_rounds=cfg.max_tool_rounds)
    return run_chat(session)
