"""``xiaolm chat``: the context-window rule (oldest turns dropped first, and said so), the commands, and the whole
program driven through piped stdin and through a pseudo terminal."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import pytest

from xiaolm.infer.chat import ChatSession, run_chat
from xiaolm.infer.generate import SamplingConfig

GREEDY = ["--temperature", "0", "--max-new-tokens", "8", "--seed", "0"]


@pytest.fixture(scope="module")
def model_and_tok(tiny_run):
    from xiaolm.model.io import load_model

    model, tok, _ = load_model(tiny_run)
    return model, tok


def _session(model_and_tok, context=128, system=None, max_new=8):
    model, tok = model_and_tok
    return ChatSession(model, tok, SamplingConfig(max_new_tokens=max_new, temperature=0.0), context, system)


def test_history_is_kept_and_oldest_turns_are_dropped_first(model_and_tok):
    s = _session(model_and_tok, context=128, system="你是故事大王。")
    notes, out = [], []
    for k in range(8):
        answer = s.reply(f"第{k}个问题：小猫在做什么呢？", out.append, notes.append)
        assert answer is not None
        ids, dropped = s.prompt_ids()
        assert len(ids) <= s.context - s.answer_budget()
    assert len(s.turns) == 16  # the whole history is kept (and saved); only the prompt leaves turns out
    _, dropped = s.prompt_ids()
    assert dropped > 0 and dropped % 2 == 0
    assert any("oldest turn" in n and "128-token context" in n for n in notes)
    model, tok = model_and_tok
    ids, dropped = s.prompt_ids()
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\n你是故事大王。<|im_end|>")  # the system message always stays
    assert "第7个问题" in text and "第0个问题" not in text  # newest kept, oldest gone
    assert "".join(out)  # the answers were streamed


def test_a_message_too_long_for_the_window_is_refused(model_and_tok):
    s = _session(model_and_tok, context=32)
    notes = []
    assert s.reply("小猫" * 40, lambda _: None, notes.append) is None
    assert s.turns == [] and "fewer words" in notes[0]


def test_commands_on_piped_input(model_and_tok, tmp_path):
    s = _session(model_and_tok)
    saved, after_reset = tmp_path / "a.json", tmp_path / "b.json"
    stdin = io.StringIO(f"你好\n/system 你是故事大王。\n讲个故事\n/save {saved}\n/reset\n/save {after_reset}\n"
                        "/bogus\n/quit\n不会读到这里\n")
    stdout, stderr = io.StringIO(), io.StringIO()
    assert run_chat(s, stdin, stdout, stderr, interactive=False) == 0
    convo = json.loads(saved.read_text(encoding="utf-8"))["messages"]
    assert [m["role"] for m in convo] == ["system", "user", "assistant", "user", "assistant"]
    assert convo[0]["content"] == "你是故事大王。" and convo[1]["content"] == "你好"
    assert json.loads(after_reset.read_text(encoding="utf-8"))["messages"] == [
        {"role": "system", "content": "你是故事大王。"}]
    assert stdout.getvalue() == convo[2]["content"] + "\n" + convo[4]["content"] + "\n"  # answers, streamed
    err = stderr.getvalue()
    assert "conversation cleared" in err and "unknown command /bogus" in err


def _env():
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def test_chat_program_through_stdin(tiny_run, tmp_path):
    saved = tmp_path / "chat.json"
    proc = subprocess.run(
        [sys.executable, "-m", "xiaolm", "chat", str(tiny_run), *GREEDY, "--system", "讲故事"],
        input=f"从前有一只小猫\n后来呢\n/save {saved}\n", capture_output=True, text=True, timeout=120, env=_env(),
    )
    assert proc.returncode == 0, proc.stderr
    convo = json.loads(saved.read_text(encoding="utf-8"))["messages"]
    assert [m["role"] for m in convo] == ["system", "user", "assistant", "user", "assistant"]
    assert proc.stdout == convo[2]["content"] + "\n" + convo[4]["content"] + "\n"


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo terminals are POSIX")
def test_chat_program_in_a_pseudo_terminal(tiny_run):
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # child: the chat program on the terminal
        os.execve(sys.executable, [sys.executable, "-m", "xiaolm", "chat", str(tiny_run), *GREEDY], _env())

    def read_until(marker: str, timeout: float = 90.0) -> str:
        buf = b""
        deadline = time.time() + timeout
        while marker.encode() not in buf:
            if time.time() > deadline:
                raise AssertionError(f"timed out waiting for {marker!r}; got {buf.decode(errors='replace')!r}")
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                try:
                    buf += os.read(fd, 4096)
                except OSError:
                    break
        return buf.decode("utf-8", errors="replace")

    try:
        banner = read_until("你> ")
        assert "/reset" in banner  # the help line is shown on a terminal
        os.write(fd, "从前有一只小猫\n".encode())
        answer = read_until("你> ")
        assert "模型> " in answer
        os.write(fd, b"/quit\n")
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)


def test_chat_refuses_bad_sampling_flags(tiny_run, capsys):
    from xiaolm.cli import main

    assert main(["chat", str(tiny_run), "--top-p", "7"]) == 2 and "--top-p" in capsys.readouterr().err
