"""Where a route's runs live, from its resolved recipe (a ``PipelineConfig`` after ``route.wire``).

Shared by ``route`` (the stage table), ``evaluate`` and ``report``; the last two import these from here, not from
``route``, because ``route`` imports them.
"""
from __future__ import annotations

from pathlib import Path


def instruct_dir(cfg) -> Path:
    return Path(cfg.instruct_mix.out if cfg.instruct_mix.sources else cfg.instruct.out)


def final_run(cfg) -> str:
    return {"dpo": cfg.dpo.out, "grpo": cfg.grpo.out}.get(cfg.align, cfg.sft.out)


def _eval_models(cfg) -> dict[str, str]:
    models = {"base": cfg.pretrain.out, "sft": cfg.sft.out}
    if cfg.align != "none":
        models[cfg.align] = final_run(cfg)
    return models
