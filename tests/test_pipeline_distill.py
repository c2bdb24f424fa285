"""``xiaolm pipeline``'s optional distillation stage: off by default; when on, a student trained alone and one taught
by the route's own pretrained model, both scored and set side by side in REPORT.md; a rerun skips the stage."""
from __future__ import annotations

import json
import math
import re

from test_pipeline import STORY_RECIPE, TINY_COMMON, _plan, _tinystories_fixture

from xiaolm.cli import main

STAGES = ["--stages", "prepare", "tokenizer", "tokenize", "pretrain", "distill", "report"]
DISTILL = ["--distill.enabled", "--distill.student-max-steps", "8", "--distill.student-preset", "tiny",
           "--distill.alpha", "0.3"]


def test_distillation_stage_is_off_by_default(tmp_path):
    data = _tinystories_fixture(tmp_path / "TinyStoriesChinese", n_files=1, per_file=20)
    plan = _plan(["--config", str(STORY_RECIPE), "--workdir", str(tmp_path / "w"), "--prepare.inputs", str(data)])
    assert plan["distill"]["action"] == "off" and plan["pretrain"]["action"] == "run"


def test_distillation_stage_reports_both_students_and_a_rerun_skips_it(tmp_path):
    data = _tinystories_fixture(tmp_path / "TinyStoriesChinese", n_files=1, per_file=150)
    work = tmp_path / "work"
    argv = ["--config", str(STORY_RECIPE), "--workdir", str(work), "--prepare.inputs", str(data), *TINY_COMMON,
            *STAGES, *DISTILL]
    assert main(["pipeline", *argv]) == 0

    result = json.loads((work / "distill" / "distill.json").read_text())
    models = result["models"]
    assert models["teacher"]["run"] == str(work / "run")  # teacher: route = the route's pretrained model
    plain = json.loads((work / "distill" / "plain" / "summary.json").read_text())
    taught = json.loads((work / "distill" / "student" / "summary.json").read_text())
    assert "distill" not in plain and taught["distill"]["mode"] == "online"
    assert taught["distill"]["teacher"] == str(work / "run") and taught["distill"]["alpha"] == 0.3
    assert plain["steps"] == taught["steps"] == 8 and plain["tokens"] == taught["tokens"]
    for name in ("teacher", "plain", "student"):
        assert math.isfinite(models[name]["bits_per_char"]) and models[name]["bits_per_char"] > 0
    # Same shape, data, seed and steps: only the teacher differs, so the two students' scores do too.
    assert models["plain"]["params"] == models["student"]["params"]
    assert models["plain"]["bits_per_char"] != models["student"]["bits_per_char"]

    report = (work / "REPORT.md").read_text()
    section = report.split("## Distillation", 1)[1]
    for name, label in (("plain", "student without a teacher"), ("student", "student with the teacher")):
        row = re.search(rf"^\| {label} \|.*$", section, re.M).group(0)
        assert f"| {models[name]['bits_per_char']:.4f} |" in row, row
        assert f"| {models[name]['rep4']:.3f} | {models[name]['distinct2']:.3f} |" in row, row

    plan = _plan(argv)
    assert plan["distill"]["action"] == "skip" and plan["pretrain"]["action"] == "skip"
    changed = _plan(argv + ["--distill.alpha", "0.7"])
    assert changed["distill"]["action"] == "rerun" and changed["pretrain"]["action"] == "skip"
    retrained = _plan(argv + ["--pretrain.train.max-steps", "21"])  # a new teacher: the students follow
    assert retrained["pretrain"]["action"] == "rerun" and retrained["distill"]["action"] == "rerun"

    # Interrupted after both students finished (before the scores were written): the rerun resumes the stage,
    # trains neither student again and writes the same scores.
    state_file = work / "state" / "distill.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "status": "running"}))
    (work / "distill" / "distill.json").unlink()
    trained = {n: (work / "distill" / n / "summary.json").stat().st_mtime_ns for n in ("plain", "student")}
    assert _plan(argv)["distill"]["action"] == "resume"
    assert main(["pipeline", *argv]) == 0
    again = json.loads((work / "distill" / "distill.json").read_text())
    assert {n: (work / "distill" / n / "summary.json").stat().st_mtime_ns for n in trained} == trained
    assert {n: r["bits_per_char"] for n, r in again["models"].items()} == \
        {n: r["bits_per_char"] for n, r in models.items()}
