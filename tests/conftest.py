"""Shared, session-scoped fixtures: the pipeline is built once (stories -> prepared corpus -> tokenizer -> shards ->
tiny pretrained model) and every test that needs a stage reuses it. Budgets are tiny so the suite stays fast.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see xiaolm.cli.main
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def load_bench(name: str):
    """The script ``bench/NAME.py`` as a module (bench/ is not a package), registered in ``sys.modules`` so that
    its dataclasses can look their module up."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real corpora beside the project; tests that need them skip with a reason when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def stories_file(tmp_path_factory) -> Path:
    """1,500 built-in stories, seed 0, in TinyStoriesChinese's layout."""
    from xiaolm.data.synth import write_stories

    path = tmp_path_factory.mktemp("stories") / "stories.jsonl"
    write_stories(path, num=1500, seed=0)
    return path


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory, stories_file) -> Path:
    from xiaolm.data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared")
    prepare([str(stories_file)], out, field="story_zh")
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, prepared_dir) -> Path:
    from xiaolm.data.vocab import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer([str(prepared_dir)], out, vocab_size=1024)
    return out


@pytest.fixture(scope="session")
def shards_dir(tmp_path_factory, prepared_dir, tokenizer_dir) -> Path:
    from xiaolm.data.shards import tokenize_to_shards

    out = tmp_path_factory.mktemp("shards")
    tokenize_to_shards([str(prepared_dir)], tokenizer_dir, out, workers=2)
    return out


# tied on purpose: the export tests built on tiny_run check the tied layout (no lm_head stored, re-tied on load);
# the untied default is what the headline and quickstart models train with
TINY_PRETRAIN = [
    "--preset", "tiny", "--seq-len", "128", "--micro-batch-size", "8", "--lr", "3e-3", "--warmup-steps", "10",
    "--tie-word-embeddings",
    "--eval-tokens", "4096", "--sample-tokens", "16", "--log-every", "10", "--no-progress", "--no-tensorboard",
]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, shards_dir) -> Path:
    """A tiny model pretrained for 120 steps on the built-in stories: a RUNDIR for the later stages' tests."""
    from xiaolm.cli import main

    out = tmp_path_factory.mktemp("tiny_run")
    assert main(["pretrain", "--data", str(shards_dir), "--out", str(out), "--max-steps", "120",
                 "--eval-every", "60", *TINY_PRETRAIN]) == 0
    return out


@pytest.fixture(scope="session")
def loaded(tiny_run):
    """``(model, tokenizer)`` of ``tiny_run`` on the CPU, loaded once for the serving tests."""
    from xiaolm.model.io import load_model

    model, tokenizer, _info = load_model(tiny_run, device="cpu")
    return model, tokenizer


# The instruction-tuning and alignment headlines share one story model: pretrained on the built-in stories, then
# SFT on instructions built from them. Budgets are CPU-sized (a few minutes on 2 cores) and every seed is fixed.
# Instructions keep each constraint with probability 0.3 (at least one), so many carry one or two constraints: with
# three or four, "all met" is out of reach of a sub-1M-parameter model and could not show a difference. On the
# default base (recipe v2 with document masking), SFT at lr 1e-3 uses the asked-for words 38 times in 204, another
# instruction's words 18 times; without document masking 31 vs 18 (docs/RECIPE.md; on the tied recipe-1201 base:
# 15 vs 18, no reading at all). On the recipe-v2 base without masking, SFT at 3e-3 reads the prompt more
# (34 vs 14) but then DPO no longer raises 对话 without more repetition at this budget (measured: 60% -> 57.5% with
# 256 pair prompts; 60% -> 65% but rep-4 0.059 -> 0.061 with 384), so the alignment headline keeps 1e-3.
HEADLINE_PRETRAIN_STEPS = 300
HEADLINE_SFT_STEPS = 600
HEADLINE_EVAL_LIMIT = None  # every held-out instruction (about 200)


@pytest.fixture(scope="session")
def story_sft(tmp_path_factory, stories_file, shards_dir) -> dict:
    """``{"base": RUNDIR, "sft": SFTDIR, "instruct": DIR}`` for the headline tests."""
    from xiaolm.cli import main

    root = tmp_path_factory.mktemp("story_sft")
    quiet = ["--no-progress", "--no-tensorboard", "--log-every", "100"]
    assert main(["data", "instruct", str(stories_file), "--out", str(root / "instruct"),
                 "--samples-per-story", "3", "--keep-prob", "0.3", "--seed", "0"]) == 0
    assert main(["pretrain", "--data", str(shards_dir), "--out", str(root / "base"), "--preset", "quickstart",
                 "--seq-len", "512", "--micro-batch-size", "8", "--lr", "1.2e-2", "--warmup-steps", "30",
                 "--max-steps", str(HEADLINE_PRETRAIN_STEPS), "--eval-every", "0", "--eval-tokens", "8192",
                 "--sample-tokens", "0", "--train.seed", "0", *quiet]) == 0
    assert main(["sft", str(root / "base"), "--data", str(root / "instruct"), "--out", str(root / "sft"),
                 "--max-steps", str(HEADLINE_SFT_STEPS), "--lr", "1e-3", "--warmup-steps", "30",
                 "--micro-batch-size", "8", "--seq-len", "512", "--eval-every", "0", "--sample-prompts", "0",
                 "--train.seed", "0", *quiet]) == 0
    return {"base": root / "base", "sft": root / "sft", "instruct": root / "instruct"}


@pytest.fixture(scope="session")
def heldout_eval(story_sft):
    """``heldout_eval(run, style="chat")``: the instruction eval of a model on the headline's held-out instructions
    (greedy, 200 new tokens), computed once per run and prompt style and shared by the headline tests."""
    from xiaolm.eval.instruct import evaluate_instruct, load_eval_samples
    from xiaolm.infer.generate import SamplingConfig
    from xiaolm.model.io import load_model

    samples, _ = load_eval_samples([str(story_sft["instruct"] / "heldout.jsonl")], limit=HEADLINE_EVAL_LIMIT)
    cache: dict[str, dict] = {}

    def evaluate(run, style: str = "chat") -> dict:
        key = f"{run}:{style}"
        if key not in cache:
            model, tokenizer, _ = load_model(run)
            greedy = SamplingConfig(max_new_tokens=200, temperature=0.0, seed=0)
            cache[key] = evaluate_instruct(model, tokenizer, samples, style, greedy, batch_size=48)
        return cache[key]

    return evaluate


# ------------------------------------------------------------------------------------ markers: slow, gpu


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:      # a broken torch install is "no CUDA" here, not a collection error
        return False


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests skip with a reason where CUDA is absent; ``slow`` tests run only when ``-m`` names them
    (``pytest -m slow``), so the default ``pytest -q`` stays fast."""
    markexpr = config.getoption("markexpr", "") or ""
    run_slow = "slow" in markexpr and "not slow" not in markexpr
    no_cuda = None
    for item in items:
        if "gpu" in item.keywords:
            if no_cuda is None:
                no_cuda = not cuda_available()
            if no_cuda:
                item.add_marker(pytest.mark.skip(reason="gpu: needs a CUDA device (torch.cuda.is_available() is False)"))
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: run with pytest -m slow"))


def stop_process(proc) -> str:
    """SIGTERM a server started with Popen (SIGKILL after 20 s) and return what it printed."""
    import subprocess

    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out.decode(errors="replace")



@pytest.fixture
def two_ranks_like_one():
    """``check(one, two, common, steps, loss_tol)``: pretrain with ``common`` flags in two processes (torchrun on a
    free port, one thread each) into ``two`` and compare with the one-process run already in ``one``: the same
    ``steps`` logged losses within ``loss_tol``, and final weights within 1e-4."""
    import json
    import subprocess
    import sys

    from xiaolm.model.io import load_model

    def losses(run: Path) -> list[float]:
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in recs if r["kind"] == "train"]

    def check(one: Path, two: Path, common: list[str], steps: int, loss_tol: float) -> None:
        res = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",  # a free port
             "-m", "xiaolm", "pretrain", "--out", str(two), "--grad-accum-steps", "1", *common],
            capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        assert res.returncode == 0, res.stderr[-3000:]
        a, b = losses(one), losses(two)
        assert len(a) == len(b) == steps
        assert max(abs(x - y) for x, y in zip(a, b)) < loss_tol
        wa, _, _ = load_model(one, with_tokenizer=False)
        wb, _, _ = load_model(two, with_tokenizer=False)
        for (name, pa), pb in zip(wa.named_parameters(), wb.parameters()):
            assert (pa - pb).abs().max() < 1e-4, name

    return check


@pytest.fixture(scope="session")
def tool_run(tmp_path_factory, shards_dir) -> Path:
    """A tiny model with a 2048-token context, room for tool schemas (two pretraining steps: a real RUNDIR,
    quickly), for the tool-serving tests."""
    from xiaolm.cli import main

    out = tmp_path_factory.mktemp("tool_run")
    assert main(["pretrain", "--data", str(shards_dir), "--out", str(out), "--preset", "tiny", "--seq-len", "2048",
                 "--micro-batch-size", "1", "--max-steps", "2", "--warmup-steps", "1", "--eval-every", "0",
                 "--sample-tokens", "0", "--no-progress", "--no-tensorboard"]) == 0
    return out
