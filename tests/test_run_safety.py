"""Run directories a resume, a missing pointer or a full disk cannot break: a resume that does not fit the run is
refused before anything in the run directory changes, a checkpoint without ``latest`` is still found, a full disk
says so in one line and leaves the previous checkpoint intact, and published weights get normal permissions."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from xiaolm.cli import main
from xiaolm.model.io import find_checkpoint, load_model, verify_checkpoint

from conftest import TINY_PRETRAIN

SHORT = [*TINY_PRETRAIN, "--eval-every", "0", "--eval-tokens", "1024", "--sample-tokens", "0"]


def _pretrain(shards, out, *extra):
    return main(["pretrain", "--data", str(shards), "--out", str(out), *SHORT, *extra])


def _tree_hash(root: Path) -> dict[str, str]:
    """Every file's sha256, the run directory's lock file aside (it names whoever claimed the directory last)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".xiaolm.lock"}


def _refused(capsys, *call) -> str:
    code = _pretrain(*call)
    assert code not in (0, None)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, shards_dir) -> Path:
    """4 steps, checkpoints at 2 and 4: the run every test here copies."""
    out = tmp_path_factory.mktemp("short_run") / "run"
    assert _pretrain(shards_dir, out, "--max-steps", "4", "--save-every", "2") == 0
    return out


@pytest.fixture(scope="module")
def other_tokenizer_shards(tmp_path_factory, tokenizer_dir, prepared_dir) -> Path:
    """Shards made by a tokenizer with the same vocabulary size but different ids (two tokens swapped)."""
    from xiaolm.data.shards import tokenize_to_shards

    root = tmp_path_factory.mktemp("other_tok")
    tok = root / "tok"
    shutil.copytree(tokenizer_dir, tok)
    data = json.loads((tok / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (tok / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    (tok / "xiaolm_tokenizer.json").unlink(missing_ok=True)
    tokenize_to_shards([str(prepared_dir)], tok, root / "shards", workers=1, progress=False)
    return root / "shards"


def test_resume_with_shards_of_another_tokenizer_is_refused_before_touching_the_run(
        short_run, other_tokenizer_shards, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    before = _tree_hash(run)
    err = _refused(capsys, other_tokenizer_shards, run, "--max-steps", "6", "--resume")
    assert "tokenizer" in err and err.count("\n") == 1, err
    assert _tree_hash(run) == before  # tokenizer/, config.yaml, checkpoints: all untouched
    load_model(run)


def test_resume_with_a_changed_model_config_names_the_fields_and_touches_nothing(
        short_run, shards_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    before = _tree_hash(run)
    err = _refused(capsys, shards_dir, run, "--max-steps", "6", "--hidden-size", "96", "--resume")
    assert "hidden_size" in err and "64" in err and "96" in err and "--init-from" in err, err
    assert err.count("\n") == 1, err
    assert _tree_hash(run) == before
    err = _refused(capsys, shards_dir, run, "--max-steps", "6", "--seq-len", "64", "--resume")
    assert "seq_len" in err and "128" in err and "64" in err, err
    assert _tree_hash(run) == before
    # The unchanged command still resumes.
    assert _pretrain(shards_dir, run, "--max-steps", "6", "--resume") == 0
    assert find_checkpoint(run).name == "step-00000006"


def test_a_checkpoint_without_latest_pointer_is_found_and_resume_from_picks_an_earlier_one(
        short_run, shards_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    ckpts = run / "checkpoints"
    (ckpts / "latest").unlink()  # what a full disk leaves after the checkpoint itself was renamed into place
    assert find_checkpoint(run).name == "step-00000004"
    # A newer checkpoint that does not verify is passed over for the newest one that does.
    shutil.copytree(ckpts / "step-00000004", ckpts / "step-00000005")
    weights = ckpts / "step-00000005" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert find_checkpoint(run).name == "step-00000004"
    shutil.rmtree(ckpts / "step-00000005")
    capsys.readouterr()
    assert _pretrain(shards_dir, run, "--max-steps", "6", "--resume") == 0
    assert "step-00000004 (step 4" in capsys.readouterr().err
    # --resume-from STEP goes back to an earlier checkpoint (and implies --resume).
    assert _pretrain(shards_dir, run, "--max-steps", "6", "--resume-from", "2") == 0
    err = capsys.readouterr().err
    assert "step-00000002 (step 2" in err
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 6
    # ... or a checkpoint directory given by path.
    assert _pretrain(shards_dir, run, "--max-steps", "6", "--resume-from",
                     str(ckpts / "step-00000006")) == 0
    assert "step-00000006 (step 6" in capsys.readouterr().err
    err = _refused(capsys, shards_dir, run, "--max-steps", "6", "--resume-from", "3")
    assert "step-00000003" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("failure", ["enospc", "safetensors", "torch-enforce"])
def test_full_disk_while_writing_a_checkpoint_is_one_line_and_the_previous_one_survives(
        shards_dir, tmp_path, monkeypatch, capsys, failure):
    import xiaolm.train.checkpoint as ck

    real_save_file, real_torch_save = ck.save_file, ck.torch.save
    calls = {"n": 0}

    def full_disk_save_file(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint (step 4): half a file, then the disk is full
            Path(filename).write_bytes(b"\0" * 100)
            if failure == "safetensors":  # what safetensors raises on a full tmpfs
                from safetensors import SafetensorError

                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save_file(tensors, filename, metadata=metadata)

    def full_disk_torch_save(obj, f, *a, **k):
        if calls["n"] >= 2:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2944 vs 2838")
        return real_torch_save(obj, f, *a, **k)

    def counting_save_file(tensors, filename, metadata=None):
        calls["n"] += 1
        return real_save_file(tensors, filename, metadata=metadata)

    if failure != "torch-enforce":
        monkeypatch.setattr(ck, "save_file", full_disk_save_file)
    else:
        monkeypatch.setattr(ck, "save_file", counting_save_file)
        monkeypatch.setattr(ck.torch, "save", full_disk_torch_save)
    run = tmp_path / "run"
    err = _refused(capsys, shards_dir, run, "--max-steps", "6", "--save-every", "2")
    lines = [x for x in err.splitlines() if x.startswith("xiaolm: error:")]
    assert len(lines) == 1, err
    assert "no space left on device while writing" in lines[0] and "step-00000004" in lines[0], err
    assert "the previous checkpoint step-00000002 is intact" in lines[0], err
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no half-written leftovers
    verify_checkpoint(find_checkpoint(run))
    assert find_checkpoint(run).name == "step-00000002"
    monkeypatch.undo()
    assert _pretrain(shards_dir, run, "--max-steps", "6", "--save-every", "2", "--resume") == 0
    assert find_checkpoint(run).name == "step-00000006"


def test_weights_in_checkpoints_and_exports_get_normal_permissions(short_run, tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    normal = 0o666 & ~umask
    ckpt = find_checkpoint(short_run)
    for f in ckpt.iterdir():
        assert f.stat().st_mode & 0o777 == normal, f
    out = tmp_path / "hf"
    assert main(["export", "hf", str(short_run), str(out)]) == 0
    for f in out.iterdir():
        if f.is_file():
            assert f.stat().st_mode & 0o777 == normal, f


def _chat_and_pairs(root: Path) -> tuple[Path, Path]:
    from xiaolm.utils import write_jsonl

    chat = [{"messages": [{"role": "user", "content": f"讲第{i}个故事。"},
                          {"role": "assistant", "content": "从前有一只小猫。"}]} for i in range(30)]
    pairs = [{"prompt": [{"role": "user", "content": f"第{i}个问题？"}], "chosen": "好的故事。",
              "rejected": "小猫小猫小猫"} for i in range(30)]
    write_jsonl(root / "chat.jsonl", chat)
    write_jsonl(root / "pairs.jsonl", pairs)
    return root / "chat.jsonl", root / "pairs.jsonl"


@pytest.mark.parametrize("verb", ["sft", "dpo", "reward", "grpo"])
def test_fine_tune_resume_from_another_base_is_refused_before_touching_the_run(
        verb, short_run, other_tokenizer_shards, tmp_path, capsys):
    chat, pairs = _chat_and_pairs(tmp_path)
    other_base = tmp_path / "other_base"  # same config, another tokenizer
    assert _pretrain(other_tokenizer_shards, other_base, "--max-steps", "2") == 0
    quiet = ["--no-progress", "--no-tensorboard", "--device", "cpu", "--micro-batch-size", "4", "--max-steps", "2",
             "--eval-every", "0"]
    quiet += {"sft": ["--data", str(chat), "--sample-prompts", "0"], "dpo": ["--data", str(pairs)],
              "reward": ["--data", str(pairs)],
              "grpo": ["--prompts", str(chat), "--group-size", "2", "--prompts-per-step", "2",
                       "--max-new-tokens", "4"]}[verb]
    run = tmp_path / "run"
    assert main([verb, str(short_run), "--out", str(run), *quiet, "--stop-at-step", "1"]) == 0
    before = _tree_hash(run)
    code = main([verb, str(other_base), "--out", str(run), *quiet, "--resume"])
    assert code not in (0, None)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "tokenizer" in err.splitlines()[-1], err
    assert _tree_hash(run) == before
    assert main([verb, str(short_run), "--out", str(run), *quiet, "--resume"]) == 0
    assert find_checkpoint(run).name == "step-00000002"


def test_full_disk_while_writing_metrics_is_one_line(shards_dir, tmp_path, monkeypatch, capsys):
    import xiaolm.train.metrics as metrics

    real = metrics.MetricsLog.write

    def full_after_step_2(self, record):
        if record.get("step", 0) > 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return real(self, record)

    monkeypatch.setattr(metrics.MetricsLog, "write", full_after_step_2)
    run = tmp_path / "run"
    err = _refused(capsys, shards_dir, run, "--max-steps", "6", "--save-every", "2", "--log-every", "1")
    lines = [x for x in err.splitlines() if x.startswith("xiaolm: error:")]
    assert len(lines) == 1 and "no space left on device" in lines[0] and "metrics.jsonl" in lines[0], err
    assert "--resume" in lines[0]
    assert find_checkpoint(run).name == "step-00000002"


def test_full_disk_while_writing_the_latest_pointer_names_the_complete_checkpoint(
        shards_dir, tmp_path, monkeypatch, capsys):
    import xiaolm.train.checkpoint as ck

    real = ck.atomic_write_text

    def full_at_step_4(path, text):
        if text.strip() == "step-00000004":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, text)

    monkeypatch.setattr(ck, "atomic_write_text", full_at_step_4)
    run = tmp_path / "run"
    err = _refused(capsys, shards_dir, run, "--max-steps", "6", "--save-every", "2")
    line = [x for x in err.splitlines() if x.startswith("xiaolm: error:")][-1]
    assert "no space left on device" in line and "step-00000004 is complete" in line and "--resume-from 4" in line
    monkeypatch.undo()
    verify_checkpoint(run / "checkpoints" / "step-00000004")
    assert _pretrain(shards_dir, run, "--max-steps", "6", "--save-every", "2", "--resume-from", "4") == 0
    assert "step-00000004 (step 4" in capsys.readouterr().err


# --------------------------------------------------------------------------------- one owner per run directory

_HOLDER = """
import sys, time
from xiaolm.rundir import lock_run_dir
lock_run_dir(sys.argv[1], "pretrain")
print("held", flush=True)
time.sleep(120)
"""


def _hold_lock(out: Path):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_on_the_same_out_is_refused_naming_the_holder_and_a_killed_holder_does_not_block(
        shards_dir, tmp_path, capsys):
    import signal
    import socket

    run = tmp_path / "run"
    holder = _hold_lock(run)
    try:
        err = _refused(capsys, shards_dir, run, "--max-steps", "2")
        assert f"PID {holder.pid} on {socket.gethostname()}" in err and "in use by another xiaolm process" in err
        assert err.count("\n") == 1 and not (run / "config.yaml").exists() and not (run / "checkpoints").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The lock file is still there, naming the dead holder; the kernel dropped its flock, so it is stale.
    assert json.loads((run / ".xiaolm.lock").read_text())["pid"] == holder.pid
    assert _pretrain(shards_dir, run, "--max-steps", "2") == 0
    assert json.loads((run / ".xiaolm.lock").read_text())["pid"] == os.getpid()


def test_lock_is_stale_after_its_holder_died_without_flock(tmp_path, monkeypatch):
    """Where flock is unavailable the recorded PID decides: a dead PID on this host is stale, a live one refuses."""
    import fcntl
    import socket
    import subprocess
    import sys

    from xiaolm import rundir
    from xiaolm.errors import XiaolmError

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "run"
    out.mkdir()
    host = socket.gethostname()
    (out / ".xiaolm.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": host}))
    rundir.lock_run_dir(out, "pretrain")
    rundir.release_run_dirs()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".xiaolm.lock").write_text(json.dumps({"pid": live.pid, "host": host}))
        with pytest.raises(XiaolmError, match=f"PID {live.pid} on {host}"):
            rundir.lock_run_dir(out, "pretrain")
    finally:
        live.kill()
        live.wait()


def test_a_new_run_in_an_existing_run_directory_is_refused_and_overwrite_empties_it(short_run, shards_dir, tmp_path,
                                                                                    capsys):
    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    before = _tree_hash(run)
    err = _refused(capsys, shards_dir, run, "--max-steps", "2")
    assert "already holds a run" in err and "--resume" in err and "--out" in err and err.count("\n") == 1
    assert _tree_hash(run) == before  # nothing in the run changed
    err = _refused(capsys, shards_dir, run, "--max-steps", "2", "--resume", "--overwrite")
    assert "give one of them" in err
    assert _pretrain(shards_dir, run, "--max-steps", "2", "--overwrite") == 0
    steps = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert steps == ["step-00000002"]  # the old run's step-4 checkpoint is gone, not mixed in
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()][-1] == 2


def test_overwrite_never_empties_a_directory_that_is_not_a_run(shards_dir, tmp_path, capsys):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.txt").write_text("keep me")
    err = _refused(capsys, shards_dir, mine, "--max-steps", "2", "--overwrite")
    assert "not one" in err and (mine / "thesis.txt").read_text() == "keep me"


def test_a_metrics_log_cut_mid_character_does_not_block_resume(short_run, shards_dir, tmp_path, capsys):
    """A crash can cut an append-only log anywhere, even inside a character: --resume drops the incomplete last
    line and says so in one line naming the file; the records before it are kept."""
    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    metrics = run / "metrics.jsonl"
    whole = metrics.read_bytes()
    cut = json.dumps({"kind": "train", "step": 4, "note": "中文"}, ensure_ascii=False).encode("utf-8")
    metrics.write_bytes(whole + cut[: cut.index("中".encode()) + 1])  # one byte into a three-byte character
    assert _pretrain(shards_dir, run, "--max-steps", "6", "--resume") == 0
    err = capsys.readouterr().err
    assert f"{metrics}: dropped an incomplete last line" in err
    steps = [json.loads(x)["step"] for x in metrics.read_text(encoding="utf-8").splitlines()]
    assert steps[-1] == 6 and steps == sorted(steps)


def test_a_bad_byte_inside_a_jsonl_names_the_file_and_line(tmp_path):
    from xiaolm.utils import read_jsonl, read_log_lines

    f = tmp_path / "records.jsonl"
    f.write_bytes(b'{"a": 1}\n{"b": "\xe4\xb8"}\n')
    with pytest.raises(ValueError, match=f"{f}:2: not UTF-8"):
        list(read_jsonl(f))
    with pytest.raises(Exception, match=f"{f}:2: not UTF-8"):
        read_log_lines(f)


def test_teach_cache_cut_by_a_kill_is_repaired_before_appending(tmp_path, capsys):
    from xiaolm.data.teach import Cache

    path = tmp_path / "cache.jsonl"
    good = json.dumps({"key": "a", "answer": "好"}, ensure_ascii=False) + "\n"
    path.write_bytes(good.encode() + '{"key": "b", "answer": "好'.encode()[:-1])
    cache = Cache(path)
    cache.put({"key": "c", "answer": "行"})
    cache.close()
    assert "dropped an incomplete last line" in capsys.readouterr().err
    assert [json.loads(x)["key"] for x in path.read_text(encoding="utf-8").splitlines()] == ["a", "c"]
