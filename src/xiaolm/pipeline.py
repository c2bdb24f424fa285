"""``xiaolm pipeline --config RECIPE.yaml``: run the data and pretraining stages of a recipe in order.

A route recipe holds one section per stage (``prepare``, ``tokenizer``, ``tokenize``, ``pretrain``), each with
exactly the options of that stage's own verb, plus a ``workdir``. Stage outputs are wired together (prepared corpus
-> tokenizer -> shards -> run) unless the recipe names them. Every stage writes its resolved config beside its
output, so each can also be re-run alone with its own verb.

    xiaolm pipeline --config configs/tinystories-zh.yaml
    xiaolm pipeline --config configs/tinystories-zh.yaml --prepare.inputs /data/TinyStoriesChinese --stages prepare
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from xiaolm.config import opt, parse_config, save_config
from xiaolm.data.prepare import PrepareConfig
from xiaolm.data.shards import TokenizeConfig
from xiaolm.tokenizer.train import TokenizerTrainConfig
from xiaolm.train.pretrain import PretrainConfig
from xiaolm.utils import fail, log

STAGES = ("prepare", "tokenizer", "tokenize", "pretrain")


@dataclass
class PipelineConfig:
    workdir: str = opt("runs/pipeline", "directory for every stage's output (data/, tokenizer/, shards/, run/)")
    stages: list[str] = opt(list(STAGES), "stages to run, in order: prepare, tokenizer, tokenize, pretrain")
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    tokenizer: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


def wire(cfg: PipelineConfig) -> PipelineConfig:
    """Fill each stage's inputs and outputs from the previous stage's, where the recipe leaves them empty."""
    work = Path(cfg.workdir)
    data, tok, shards, run = work / "data", work / "tokenizer", work / "shards", work / "run"
    cfg.prepare.out = cfg.prepare.out or str(data)
    cfg.tokenizer.inputs = cfg.tokenizer.inputs or [cfg.prepare.out]
    cfg.tokenizer.out = cfg.tokenizer.out or str(tok)
    cfg.tokenize.inputs = cfg.tokenize.inputs or [cfg.prepare.out]
    cfg.tokenize.tokenizer = cfg.tokenize.tokenizer or cfg.tokenizer.out
    cfg.tokenize.out = cfg.tokenize.out or str(shards)
    cfg.pretrain.data = cfg.pretrain.data or cfg.tokenize.out
    cfg.pretrain.tokenizer = cfg.pretrain.tokenizer or cfg.tokenizer.out
    if cfg.pretrain.out == PretrainConfig().out:
        cfg.pretrain.out = str(run)
    return cfg


def run_pipeline(cfg: PipelineConfig) -> dict:
    from xiaolm.data import prepare as prepare_mod
    from xiaolm.data import shards as shards_mod
    from xiaolm.tokenizer import train as tokenizer_mod
    from xiaolm.train.pretrain import pretrain

    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise fail(f"unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
    cfg = wire(cfg)
    Path(cfg.workdir).mkdir(parents=True, exist_ok=True)
    save_config(cfg, Path(cfg.workdir) / "pipeline.yaml")
    results, timings = {}, {}
    for stage in STAGES:
        if stage not in cfg.stages:
            continue
        log(f"\n== pipeline stage: {stage}")
        t = time.perf_counter()
        if stage == "prepare":
            if not cfg.prepare.inputs:
                raise fail("prepare.inputs is empty: name files, directories, globs or hf:NAME datasets")
            results[stage] = prepare_mod.prepare(cfg.prepare.inputs, cfg.prepare.out, cfg.prepare)
        elif stage == "tokenizer":
            results[stage] = {"path": str(tokenizer_mod.run(cfg.tokenizer).path)}
        elif stage == "tokenize":
            results[stage] = shards_mod.run(cfg.tokenize)
        else:
            results[stage] = pretrain(cfg.pretrain)
        timings[stage] = round(time.perf_counter() - t, 1)
    log("\npipeline: " + ", ".join(f"{k} {v} s" for k, v in timings.items()))
    return {"workdir": cfg.workdir, "timings": timings, "results": results}


def main(argv: list[str]) -> int:
    cfg, _ = parse_config(
        PipelineConfig, argv, "xiaolm pipeline",
        "Run prepare -> tokenizer -> tokenize -> pretrain from one route recipe (see configs/tinystories-zh.yaml). "
        "Every stage's options are available as --STAGE.OPTION.",
    )
    summary = run_pipeline(cfg)
    pre = summary["results"].get("pretrain")
    if pre:
        from xiaolm.train.report import print_summary

        print_summary(pre, file=sys.stdout)
    return 0
