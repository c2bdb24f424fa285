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
    from xiaolm.tokenizer.train import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer([str(prepared_dir)], out, vocab_size=1024)
    return out


@pytest.fixture(scope="session")
def shards_dir(tmp_path_factory, prepared_dir, tokenizer_dir) -> Path:
    from xiaolm.data.shards import tokenize_to_shards

    out = tmp_path_factory.mktemp("shards")
    tokenize_to_shards([str(prepared_dir)], tokenizer_dir, out, workers=2)
    return out


TINY_PRETRAIN = [
    "--preset", "tiny", "--seq-len", "128", "--micro-batch-size", "8", "--lr", "3e-3", "--warmup-steps", "10",
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
