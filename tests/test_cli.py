"""Every registered verb exists and explains its options; the config system reads recipes and flags."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from pathlib import Path

from xiaolm.cli import VERBS, main
from xiaolm.config import ConfigError, config_from_dict, opt, parse_config

REPO = Path(__file__).resolve().parents[1]


def _all_verbs():
    for name, entry in VERBS.items():
        if isinstance(entry, dict):
            for sub in entry:
                yield [name, sub]
        else:
            yield [name]


@pytest.mark.parametrize("verb", list(_all_verbs()), ids=lambda v: " ".join(v))
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*verb, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and len(out) > 200


def test_top_level_help_lists_every_verb(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in VERBS:
        assert name in out
    assert main(["nonsense"]) == 2


@dataclass
class _Inner:
    lr: float = opt(1e-3, "rate")
    max_steps: Optional[int] = opt(None, "steps")
    compile: bool = opt(False, "compile")


@dataclass
class _Outer:
    data: str = opt("", "data")
    kind: Literal["a", "b"] = opt("a", "kind")
    rates: list[float] = opt([], "rates")
    train: _Inner = field(default_factory=_Inner)


def test_flags_override_recipe_override_defaults(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: from-recipe\ntrain:\n  lr: 0.5\n  max_steps: 7\n")
    cfg, _ = parse_config(_Outer, ["--config", str(recipe), "--max-steps", "9", "--rates", "1e-4,3e-4",
                                   "--compile", "--kind", "b"], "t", "d")
    assert cfg.data == "from-recipe" and cfg.train.lr == 0.5 and cfg.train.max_steps == 9
    assert cfg.train.compile is True and cfg.kind == "b" and cfg.rates == [1e-4, 3e-4]
    cfg, _ = parse_config(_Outer, ["--train.max-steps", "3", "--train.lr", "2e-3"], "t", "d")
    assert cfg.train.max_steps == 3 and cfg.train.lr == 2e-3


def test_bad_recipes_name_the_field():
    with pytest.raises(ConfigError, match=r"config\.train: unknown key\(s\) \['lrr'\]"):
        config_from_dict(_Outer, {"train": {"lrr": 1}})
    with pytest.raises(ConfigError, match=r"config\.train\.max_steps"):
        config_from_dict(_Outer, {"train": {"max_steps": "many"}})
    with pytest.raises(ConfigError, match="not one of"):
        config_from_dict(_Outer, {"kind": "c"})


def _greedy():
    return _Inner(lr=0.25, compile=True)


@dataclass
class _WithFactory:
    train: _Inner = field(default_factory=_greedy)


def test_a_flag_overlays_a_sections_own_defaults():
    """Setting one option of a section keeps the section's other defaults (not the class's)."""
    cfg, _ = parse_config(_WithFactory, ["--max-steps", "4"], "t", "d")
    assert cfg.train.max_steps == 4 and cfg.train.lr == 0.25 and cfg.train.compile is True


@dataclass
class _Documented:
    """Say what the verb does.
    examples:
      t --data x"""

    data: list[str] = opt([], "data", required="--data is required (e.g. x)")
    train: _Inner = field(default_factory=_Inner)


def test_the_help_text_is_the_config_docstring(capsys):
    with pytest.raises(SystemExit):
        parse_config(_Documented, ["--help"], "t")
    out = capsys.readouterr().out
    assert "\nSay what the verb does.\nexamples:\n  t --data x\n\n" in out
    # A dataclass without a docstring gets a generated ``_Outer(data: str = ...)`` one: not a description.
    with pytest.raises(SystemExit):
        parse_config(_Outer, ["--help"], "t")
    out = capsys.readouterr().out
    assert "_Outer(" not in out and out.split("\n\n")[1].startswith("options:")
    with pytest.raises(SystemExit):  # an explicit description still wins
        parse_config(_Documented, ["--help"], "t", "other words")
    assert "other words" in capsys.readouterr().out


def test_a_required_option_is_checked_after_the_recipe(tmp_path):
    with pytest.raises(ConfigError, match=r"^--data is required \(e\.g\. x\)$"):
        parse_config(_Documented, [], "t")
    with pytest.raises(ConfigError, match="--data is required"):  # an empty list is as good as none
        parse_config(_Documented, ["--config", str(_recipe(tmp_path, "data: []\n"))], "t")
    cfg, _ = parse_config(_Documented, ["--config", str(_recipe(tmp_path, "data: [a.jsonl]\n"))], "t")
    assert cfg.data == ["a.jsonl"]
    cfg, _ = parse_config(_Documented, ["--data", "b.jsonl"], "t")
    assert cfg.data == ["b.jsonl"]


@dataclass
class _Route:
    step: _Documented = field(default_factory=_Documented)


def test_a_required_option_of_a_nested_section_is_left_to_its_owner():
    cfg, _ = parse_config(_Route, [], "t", "d")  # e.g. the pipeline fills prepare.out itself
    assert cfg.step.data == []


def _recipe(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_a_section_overlay_keeps_unset_fields_at_none():
    # A recipe that sets one key of a nested section must not turn that section's unset (None) fields into errors.
    from xiaolm.pipeline import PipelineConfig

    cfg = config_from_dict(PipelineConfig, {"pretrain": {"train": {"lr": 1e-3}}})
    assert cfg.pretrain.data is None and cfg.pretrain.train.lr == 1e-3


def test_every_recipe_in_configs_loads_with_its_verb():
    import yaml

    from xiaolm.align.dpo import DPOConfig
    from xiaolm.align.grpo import GRPOConfig
    from xiaolm.align.reward import RewardConfig
    from xiaolm.pipeline import PipelineConfig
    from xiaolm.train.sft import SFTConfig

    kinds = {"tinystories": PipelineConfig, "general": PipelineConfig, "sft": SFTConfig, "reward": RewardConfig, "dpo": DPOConfig,
             "grpo": GRPOConfig}
    recipes = sorted((REPO / "configs").glob("*.yaml"))
    assert len(recipes) >= 6
    for path in recipes:
        cls = kinds[path.stem.split("-")[0]]
        config_from_dict(cls, yaml.safe_load(path.read_text(encoding="utf-8")), str(path))


def test_a_repeated_list_flag_adds_its_values():
    cfg, _ = parse_config(_Outer, ["--rates", "1e-4", "--rates", "3e-4,5e-4"], "t", "d")
    assert cfg.rates == [1e-4, 3e-4, 5e-4]
