"""Tool tasks: the sandbox's limits, the built-in tools, the generated problems, their checker and reward, the
held-out split, and ``xiaolm data tools``."""
from __future__ import annotations

import json
import random

import pytest

from xiaolm.errors import XiaolmError
from xiaolm.tasks.agent import KINDS, ToolDataConfig, build_tool_data, check_answer, make_problem, reward, solve
from xiaolm.tasks.sandbox import run_tool
from xiaolm.tasks.toolbox import TOOLS, calculator, call_tool, city_info, convert_unit, date_add, weekday


def read_file():
    with open("/etc/hostname", encoding="utf-8") as f:
        return f.read()


def write_file(path):
    with open(path, "w", encoding="utf-8") as f:
        f.write("x")
    return "written"


def open_socket():
    import socket

    socket.create_connection(("127.0.0.1", 9))
    return "connected"


def start_process():
    import subprocess

    return subprocess.run(["true"]).returncode


def use_os():
    import os

    os.system("true")
    return "ran"


def spin():
    while True:
        pass


def boom(x):
    raise ValueError(f"bad {x}")


def test_sandbox_refuses_files_network_processes(tmp_path):
    for fn, args in ((read_file, {}), (write_file, {"path": str(tmp_path / "f")}), (open_socket, {}),
                     (start_process, {}), (use_os, {})):
        out = run_tool(fn, args)
        assert out.startswith("error: PermissionError: the tool sandbox refuses"), (fn.__name__, out)
    assert not (tmp_path / "f").exists()


def test_sandbox_time_and_size_limits():
    import time

    started = time.perf_counter()
    assert run_tool(spin, {}, timeout_s=0.5) == "error: timed out after 0.5s"
    assert time.perf_counter() - started < 3
    out = run_tool(lambda: "字" * 5000, {}, max_chars=100)
    assert out.startswith("字" * 100) and len(out) < 130 and "cut at 100" in out
    assert run_tool(lambda: {"a": [1, "二"]}, {}) == '{"a": [1, "二"]}'
    assert run_tool(boom, {"x": 3}) == "error: ValueError: bad 3"
    assert run_tool(boom, {"y": 3}).startswith("error: bad arguments for boom")
    assert run_tool(boom, ["not", "a", "dict"]).startswith("error: arguments must be a JSON object")


def test_calculator_is_exact_and_never_evaluates_code():
    rng = random.Random(0)
    for _ in range(50):
        a, b = rng.randint(10**8, 10**12), rng.randint(10**5, 10**9)
        assert calculator(f"{a}*{b}") == str(a * b)
        assert calculator(f"({a}-{b})//7") == str((a - b) // 7)
    assert calculator("10/4") == "2.5" and calculator("2**10") == "1024" and calculator("7%3") == "1"
    assert calculator("1,234×2") == "2468" and calculator("（1+2）÷3") == "1"
    for bad in ("__import__('os').system('true')", "open('/etc/passwd')", "9**9**9", "1/0", "[1]*10", "a+1"):
        assert call_tool("calculator", {"expression": bad}).startswith("error:"), bad


def test_other_tools():
    assert weekday("2026-12-07") == "星期一" and date_add("2026-12-07", 25) == "2027-01-01"
    assert convert_unit(5, "英里", "公里") == "8.0467" and convert_unit(2, "斤", "克") == "1000"
    assert call_tool("convert_unit", {"value": 1, "from_unit": "升", "to_unit": "米"}).startswith("error:")
    city = next(iter(__import__("xiaolm.tasks.toolbox", fromlist=["CITY_TABLE"]).CITY_TABLE))
    assert city_info(city, "人口").isdigit()
    assert call_tool("city_info", {"city": "不存在城", "field": "人口"}).startswith("error:")
    assert call_tool("no_such_tool", {}).startswith("error:")
    for name, (fn, schema) in TOOLS.items():
        assert schema["function"]["name"] == name
        assert set(schema["function"]["parameters"]["required"]) <= set(schema["function"]["parameters"]["properties"])


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_solves_and_checks(kind):
    rng = random.Random(1)
    problem = make_problem(kind, rng, heldout=False)
    rec = solve(problem, thinking=True, tool_names=list(TOOLS))
    task = rec["task"]
    msgs = rec["messages"]
    final = msgs[-1]["content"]
    assert msgs[-1]["reasoning_content"] and check_answer(task, final)
    # the recorded results are the real tools' answers through the sandbox
    results = [m["content"] for m in msgs if m["role"] == "tool"]
    assert results == [call_tool(c["name"], c["arguments"]) for c in task["calls"]]
    assert len(task["calls"]) == (2 if kind in ("date_weekday", "lookup_calc", "compare") else 1)
    # a wrong final answer fails, and so does naming the right one before a wrong one
    wrong = {"int": str(int(task["answer"]) + 1) if task["answer_type"] == "int" else "",
             "number": "0.5", "date": "1999-01-01", "weekday": "星期八",
             "choice": [c for c in task["choices"] if c != task["answer"]][:1]}[task["answer_type"]]
    wrong = wrong[0] if isinstance(wrong, list) else wrong
    assert not check_answer(task, f"答案是 {wrong}")
    if task["answer_type"] in ("int", "choice", "date"):
        assert not check_answer(task, f"可能是 {task['answer']}，也可能是 {wrong}")
    calls = task["calls"]
    assert reward(task, final, calls, 0) == pytest.approx(1.1)
    assert reward(task, f"答案是 {wrong}", calls, 0) == pytest.approx(0.1)
    assert reward(task, final, calls, 1) == pytest.approx(1.0)
    assert reward(task, None, calls, 0) == 0.0


def test_heldout_shares_no_entities_and_the_verb_is_deterministic(tmp_path, capsys):
    from xiaolm.cli import main

    for name in ("a", "b"):
        assert main(["data", "tools", "--out", str(tmp_path / name), "--train", "300", "--heldout", "60",
                     "--seed", "3"]) == 0
    assert "300 train samples" in capsys.readouterr().out
    a = (tmp_path / "a" / "train.jsonl").read_text(encoding="utf-8")
    assert a == (tmp_path / "b" / "train.jsonl").read_text(encoding="utf-8")
    train = [json.loads(line) for line in a.splitlines()]
    held = [json.loads(line) for line in (tmp_path / "a" / "heldout.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(train) == 300 and len(held) == 60
    held_entities = {e for s in held for e in s["task"]["entities"]}
    assert held_entities and not held_entities & {e for s in train for e in s["task"]["entities"]}
    train_text = "".join(s["task"]["question"] for s in train)
    held_cities = {e for s in held for e in s["task"]["entities"] if e.endswith(("城", "镇"))}
    assert held_cities and not any(c in train_text for c in held_cities)
    assert {s["task"]["kind"] for s in train} == set(KINDS)
    report = json.loads((tmp_path / "a" / "report.json").read_text(encoding="utf-8"))
    assert 0 < report["thinking_samples"] < 300  # mix: some with reasoning, some with empty think blocks


def test_bad_options_fail_cleanly(tmp_path):
    from xiaolm.errors import XiaolmError

    with pytest.raises(XiaolmError, match="--kinds: unknown nope"):
        build_tool_data(ToolDataConfig(out=str(tmp_path / "x"), kinds=["nope"]))
    with pytest.raises(XiaolmError, match="--thinking"):
        build_tool_data(ToolDataConfig(out=str(tmp_path / "x"), thinking="maybe"))


def test_schema_layouts_list_the_offered_tools_and_names_is_shortest():
    """``--schemas full`` renders JSON schemas (an empty system list), ``brief`` one described line per tool,
    ``names`` only the names and arguments: each names exactly the offered tools, and ``names`` is the shortest."""
    problem = make_problem("calc", random.Random(0), heldout=False)
    offered = ["weekday", "calculator"]
    full, brief, names = (solve(problem, False, offered, mode) for mode in ("full", "brief", "names"))
    assert [t["function"]["name"] for t in full["tools"]] == offered and brief["tools"] == names["tools"] == []
    systems = {mode: r["messages"][0]["content"] for mode, r in (("full", full), ("brief", brief), ("names", names))}
    assert "weekday(date)" in systems["names"] and "calculator(expression)" in systems["names"]
    assert "convert_unit" not in systems["names"] and "星期几" not in systems["names"]  # no descriptions
    assert "星期几" in systems["brief"] and "weekday" not in systems["full"]
    assert len(systems["names"]) < len(systems["brief"]) / 2
    with pytest.raises(XiaolmError, match="--schemas must be one of full, brief, names"):
        build_tool_data(ToolDataConfig(out="/nonexistent/x", schemas="json"))
