"""The library raises XiaolmError; only the CLI prints it (one ``xiaolm: error:`` line) and turns it into an exit code."""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest

from xiaolm import cli
from xiaolm.errors import CheckpointError, ConfigError, DataError, ExportError, XiaolmError
from xiaolm.utils import fail

SRC = Path(__file__).resolve().parents[1] / "src" / "xiaolm"


def test_fail_returns_an_error_and_prints_nothing(capsys):
    err = fail("--data x: no such file", code=3)
    assert isinstance(err, XiaolmError) and not isinstance(err, SystemExit)
    assert str(err) == "--data x: no such file" and err.code == 3
    assert fail("y").code == 2 and isinstance(fail("y", kind=DataError), DataError)
    assert capsys.readouterr() == ("", "")  # a library caller decides what to show


def test_the_modules_own_errors_are_xiaolm_errors_of_the_same_builtin_kind():
    from xiaolm.config import ConfigError as config_error
    from xiaolm.data.readers import InputError
    from xiaolm.tokenizer.hf import HFImportError
    from xiaolm.model.io import CheckpointError as checkpoint_error

    assert config_error is ConfigError and checkpoint_error is CheckpointError
    assert issubclass(ConfigError, ValueError) and issubclass(CheckpointError, RuntimeError)  # old except clauses
    assert issubclass(HFImportError, ExportError) and issubclass(InputError, DataError)
    for kind in (ConfigError, CheckpointError, HFImportError, InputError):
        assert issubclass(kind, XiaolmError)


def test_an_error_keeps_its_code_across_a_process_boundary():
    back = pickle.loads(pickle.dumps(fail("bad shard", code=1, kind=DataError)))
    assert type(back) is DataError and str(back) == "bad shard" and back.code == 1


def test_nothing_outside_the_cli_exits():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name in ("cli.py", "__main__.py"):
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"\bSystemExit\b|\bsys\.exit\b|\bos\._exit\b", line):
                offenders.append(f"{path.relative_to(SRC)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("code", [1, 2, 3])
def test_cli_prints_an_error_raised_deep_in_a_verb_as_one_line(monkeypatch, capsys, code):
    import xiaolm.infer.generate as generate

    def deep(argv):
        raise CheckpointError(f"run/checkpoints/step-00000004: incomplete checkpoint (no meta.json) {argv}", code)

    monkeypatch.setattr(generate, "main", deep)
    assert cli.main(["generate", "run"]) == code
    out, err = capsys.readouterr()
    assert out == "" and err == "xiaolm: error: run/checkpoints/step-00000004: incomplete checkpoint (no meta.json) ['run']\n"


N = "no-such-thing"
ONE_PER_STAGE = [
    ["data", "synth", "--num", "0", "--out", "x.jsonl"],
    ["data", "prepare", f"{N}.jsonl", "--out", "p"],
    ["data", "tokenize", f"{N}.jsonl", "--tokenizer", N, "--out", "s"],
    ["data", "verify", N],
    ["data", "instruct", f"{N}.jsonl", "--out", "i"],
    ["data", "pairs", "--data", f"{N}.jsonl", "--out", "q"],
    ["data", "teach", f"{N}.jsonl", "--out", "t", "--endpoint", "http://127.0.0.1:9/v1"],
    ["tokenizer", "train", f"{N}.jsonl", "--out", "tok"],
    ["pretrain", "--data", N, "--out", "r"],
    ["sweep", "--data", N, "--out", "sw", "--max-steps", "1"],
    ["sft", N, "--data", f"{N}.jsonl", "--out", "o"],
    ["dpo", N, "--data", f"{N}.jsonl", "--out", "o"],
    ["grpo", N, "--prompts", f"{N}.jsonl", "--out", "o"],
    ["reward", N, "--data", f"{N}.jsonl", "--out", "o"],
    ["generate", N, "--prompt", "x"],
    ["chat", N],
    ["eval", "ppl", N, "--data", N],
    ["eval", "instruct", N, "--data", f"{N}.jsonl"],
    ["eval", "mc", N, "--data", N],
    ["export", "hf", N, "out_hf"],
    ["export", "gguf", N, "o.gguf"],
    ["quantize", N, "--out", "qq"],
    ["serve", N],
    ["pipeline", "--workdir", "pw", "--stages", N, "--dry-run"],
]


@pytest.mark.parametrize("argv", ONE_PER_STAGE, ids=[" ".join(a[:2]) for a in ONE_PER_STAGE])
def test_every_stage_ends_an_expected_error_in_one_line(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines, err
    # progress lines may come first; the error is the one and only error line, and the last, naming what is wrong
    assert [x for x in lines if "error:" in x] == [lines[-1]], err
    named = "--num must be at least 1" if argv[:2] == ["data", "synth"] else N
    assert lines[-1].startswith("xiaolm: error: ") and named in lines[-1], err


@pytest.mark.parametrize("argv,named", [
    (["pretrain", "--data", "d", "--max-steps", "many"], "config.train.max_steps: cannot read 'many' as int"),
    (["dpo", "run", "--config", "no-such-recipe.yaml"], "recipe not found: no-such-recipe.yaml"),
])
def test_a_value_that_does_not_fit_its_field_is_one_line_not_a_usage_dump(tmp_path, monkeypatch, capsys, argv, named):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"xiaolm: error: {named}") and len(err.splitlines()) == 1, err



MISSING = [  # a verb run without an option it needs: the message each verb gave before opt(required=...) said it;
    # then a recipe that supplies it (None where the option is a positional argparse itself insists on)
    (["eval", "mc", "r"], "--data CSVDIR is required", "data: x"),
    (["eval", "ppl", "r"], "--data is required (token shards, a prepared corpus, or .jsonl/.txt files)", "data: [x]"),
    (["eval", "instruct", "r"], "--data is required (e.g. DIR/heldout.jsonl from xiaolm data instruct)", "data: [x]"),
    (["quantize", "r"], "--out QDIR is required", "out: x"),
    (["export", "hf", "r", ""], "export hf: give RUNDIR and OUTDIR", None),
    (["export", "gguf", "", "o.gguf"], "export gguf: give RUNDIR and OUT.gguf", None),
    (["serve", ""], "no model given (xiaolm serve RUNDIR)", None),
    (["data", "synth"], "--out FILE is required", "out: x\nnum: 0"),
    (["data", "prepare", "in.txt"], "--out DIR is required", "out: x"),
    (["data", "verify", ""], "give the shard directory: xiaolm data verify SHARDDIR", None),
]


@pytest.mark.parametrize("argv,message,recipe", MISSING, ids=[" ".join(a[:2]) for a, _m, _r in MISSING])
def test_a_missing_required_option_is_named_in_one_line(tmp_path, monkeypatch, capsys, argv, message, recipe):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == f"xiaolm: error: {message}\n"
    if recipe is not None:  # checked once the recipe is read: it may supply the option (the verb then fails later)
        (tmp_path / "r.yaml").write_text(recipe + "\n")
        cli.main([*argv, "--config", "r.yaml"])
        err = capsys.readouterr().err
        assert err.startswith("xiaolm: error: ") and message not in err, err
