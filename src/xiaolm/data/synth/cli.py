"""``xiaolm data synth``: its config and entry point."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from xiaolm.config import opt
from xiaolm.data.synth.records import write_stories


@dataclass
class SynthConfig:
    """Generate the built-in corpus: simple Chinese children's stories (TinyStories-style), offline and
    deterministic for a seed, as JSON Lines in TinyStoriesChinese's layout (story_zh, summary,
    instruction.words = a verb, a noun and an adjective the story uses, instruction.features from
    Dialogue, BadEnding, MoralValue, Twist, Foreshadowing, Conflict)."""

    out: str = opt("", "output JSON Lines file (the resolved config is written beside it as OUT.config.yaml)",
                   required="--out FILE is required")
    num: int = opt(10_000, "number of stories to generate")
    seed: int = opt(0, "random seed; story i depends only on (seed, i), so a shorter run is a prefix of a longer one")
    start: int = opt(0, "index of the first story (to generate a corpus in pieces)")


def main(argv: list[str] | None = None) -> int:
    from xiaolm.config import parse_config, save_config
    from xiaolm.utils import fail, log

    cfg, _ = parse_config(SynthConfig, argv, prog="xiaolm data synth",
                          epilog="example:\n  xiaolm data synth --num 20000 --seed 0 --out data/stories.jsonl")
    if cfg.num < 1:
        raise fail(f"--num must be at least 1, got {cfg.num}")
    if cfg.start < 0:
        raise fail(f"--start must be >= 0, got {cfg.start}")
    out = Path(cfg.out)
    t0 = time.perf_counter()
    count = write_stories(out, cfg.num, cfg.seed, cfg.start)
    wall = time.perf_counter() - t0
    save_config(cfg, out.with_name(out.name + ".config.yaml"))
    log(f"synth: wrote {count:,} stories to {out} in {wall:.1f} s ({count / max(wall, 1e-9):,.0f} stories/s); "
        f"config in {out.name}.config.yaml")
    return 0
