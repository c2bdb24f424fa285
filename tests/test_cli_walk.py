"""Every verb's every option, given boundary values: the answer is exit 2 and one ``xiaolm: error:`` line, never a
traceback, a usage block or a run.

Each case calls ``xiaolm.cli.main`` in-process. Values no option may take (NaN, infinities, a word for a number, an
empty number, a choice that does not exist, a fraction for an integer) are tried on every verb and must be refused
naming the option, during argument and config validation, before anything runs. Values some options take (0, a
negative, a huge number, a missing file, a directory, a GBK file) are tried on the verbs whose positional arguments
can be given a path that does not exist: whatever the option makes of the value, the verb then stops on that path,
so the case still ends in one line and nothing trains.
"""
from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from xiaolm import cli

from test_cli_options import PARSERS

NEVER = {"N": ["nan", "inf", "abc", "", "1.5"], "X": ["nan", "inf", "-inf", "Infinity", "abc", ""]}
SOMETIMES = {"N": ["0", "-1", str(10 ** 30)], "X": ["0", "-1", "1e300", "1e-300"]}
MISSING = "@ANCHOR@"  # replaced by a path under a regular file: it cannot exist, and nothing can create it


def _options(parser):
    """(flag, kind) for each option that takes a value: N integer, X float, C choice, S text."""
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0 or action.dest in ("help", "config"):
            continue
        flag = max(action.option_strings, key=lambda s: (s.count("."), len(s)))
        if action.choices is not None:
            yield flag, "C", action
        else:
            yield flag, (action.metavar if action.metavar in ("N", "X") else "S"), action


def _positionals(parser) -> list[str]:
    return [f"{MISSING}/{a.dest}" for a in parser._actions if not a.option_strings and a.nargs not in ("?", "*")
            and a.dest != "help"]


def _names(flag: str) -> set[str]:
    """Ways an error may name the option: --flag, the leaf name, the dotted field."""
    leaf = flag.lstrip("-").split(".")[-1]
    return {flag, "--" + leaf, leaf.replace("-", "_"), flag.lstrip("-").replace("-", "_")}


def _cases(every_value: bool):
    """(verb, argv head, flag, value). ``every_value``: each option with every value of its kind (the slow walk);
    else each option with one value no option takes, in turn, and every third option with one value some take (the
    suite's budget: about a minute of CPU for the whole walk). The pipeline's sections are the other verbs'
    configs (same fields, same checks): the quick walk takes its own options only; ``sweep`` is ``pretrain``'s
    parser and is left to it."""
    never, sometimes = [], []
    for verb, parser in sorted(PARSERS.items()):
        if "--config" not in parser._option_string_actions or (verb == "sweep" and not every_value):
            continue  # presets: argparse of its own, nothing to validate
        head = verb.split() + _positionals(parser)
        if verb == "pipeline":  # no positional; its work directory is where a run would start
            head += ["--workdir", f"{MISSING}/work"]
        anchored = len(head) > len(verb.split())
        for i, (flag, kind, action) in enumerate(_options(parser)):
            if verb == "pipeline" and not every_value and flag.count(".") > 1:
                continue
            bad = ["no-such-choice"] if kind == "C" else NEVER.get(kind, [])
            maybe = [] if kind == "C" or not anchored or flag == "--workdir" else (
                SOMETIMES.get(kind) or ["MISSING", "DIR", "GBK", ""])
            if not every_value:  # one value each; the values that some options take, on every third option
                bad = bad[i % len(bad):][:1] if bad else []
                maybe = maybe[(i // 3) % len(maybe):][:1] if maybe and i % 3 == 0 else []
            never += [(verb, head, flag, value) for value in bad]
            sometimes += [(verb, head, flag, value) for value in maybe]
    return never, sometimes


NEVER_CASES, SOMETIMES_CASES = _cases(every_value=False)


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout


def _walk(cases, tmp_path, capsys, must_name: bool) -> list[str]:
    gbk = tmp_path / "gbk.txt"
    gbk.write_bytes("从前有一座山\n一丌丐专丕业\n".encode("gbk"))
    anchor = tmp_path / "a-file"
    anchor.write_text("")
    paths = {"MISSING": str(tmp_path / "missing.txt"), "DIR": str(tmp_path), "GBK": str(gbk)}
    problems = []
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for verb, head, flag, value in cases:
            argv = [x.replace(MISSING, str(anchor)) for x in head] + [f"{flag}={paths.get(value, value)}"]
            signal.alarm(30)
            try:
                code = cli.main(argv)
            except _Timeout:
                problems.append(f"{' '.join(argv)}: still running after 30 s (it did not stop at validation)")
                continue
            except BaseException as exc:  # a traceback, or argparse's SystemExit
                problems.append(f"{' '.join(argv)}: raised {type(exc).__name__}: {exc}")
                continue
            finally:
                signal.alarm(0)
            out, err = capsys.readouterr()
            lines = [x for x in err.splitlines() if x.strip()]
            if code != 2 or len(lines) != 1 or not lines[0].startswith("xiaolm: error: ") or "Traceback" in err:
                problems.append(f"{' '.join(argv)}: exit {code}, stderr {err[-300:]!r}")
            elif must_name and not any(re.search(re.escape(n) + r"\b", lines[0]) for n in _names(flag)):
                problems.append(f"{' '.join(argv)}: refused without naming the option: {lines[0]}")
    finally:
        signal.signal(signal.SIGALRM, old)
    return problems


def test_values_no_option_takes_are_refused_naming_the_option(tmp_path, capsys):
    assert len(NEVER_CASES) > 500
    problems = _walk(NEVER_CASES, tmp_path, capsys, must_name=True)
    assert not problems, f"{len(problems)} of {len(NEVER_CASES)} cases:\n" + "\n".join(problems[:40])


def test_boundary_values_end_in_one_line_on_every_verb_with_a_path(tmp_path, capsys):
    assert len(SOMETIMES_CASES) > 250
    problems = _walk(SOMETIMES_CASES, tmp_path, capsys, must_name=False)
    assert not problems, f"{len(problems)} of {len(SOMETIMES_CASES)} cases:\n" + "\n".join(problems[:40])


@pytest.mark.slow
def test_every_option_with_every_value(tmp_path, capsys):
    """The whole walk (about 9,000 cases, minutes): every option of every verb with every value of its kind."""
    never, sometimes = _cases(every_value=True)
    problems = (_walk(never, tmp_path, capsys, must_name=True)
                + _walk(sometimes, tmp_path, capsys, must_name=False))
    assert not problems, f"{len(problems)} cases:\n" + "\n".join(problems[:60])


@pytest.mark.parametrize("argv,named", [
    (["quantize", "/nonexistent/run", "--out", "/nonexistent/q", "--embedding-bits", "3"], "--embedding-bits 3"),
    (["quantize", "/nonexistent/run", "--out", "/nonexistent/q", "--bits", "3"], "--bits"),
    (["generate", "/nonexistent/run", "--temperature", "Infinity"], "temperature"),
    (["pretrain", "--data", "/nonexistent/shards", "--lr", "nan"], "lr"),
    (["pretrain", "--data", "/nonexistent/shards", "--max-steps", "1.5"], "max_steps"),
])
def test_the_issue_examples(argv, named, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("xiaolm: error: ") and err.count("\n") == 1 and named in err, err
