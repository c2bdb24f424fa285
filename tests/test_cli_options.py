"""Every verb's options as a person reads them: one spelling per option in --help (the short form where there is
one), the other spellings still accepted, short flags pinned per verb, and shared options a verb ignores refused."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import re

import pytest

from xiaolm import cli
from xiaolm.config import add_config_args, opt


class _Parser(Exception):
    pass


def _verbs():
    for name, entry in cli.VERBS.items():
        if isinstance(entry, dict):
            for sub, (_summary, target) in entry.items():
                yield f"{name} {sub}", target, []
        else:
            yield name, entry[1], []
            if name == "reward":
                yield "reward score", entry[1], ["score"]


def _parser(target: str, head: list[str]) -> argparse.ArgumentParser:
    """The parser a verb builds, caught where it would parse (nothing runs)."""
    module, func = target.split(":")

    def caught(self, *args, **kwargs):
        raise _Parser(self)

    real = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = caught
    try:
        getattr(importlib.import_module(module), func)([*head, "--help"])
    except _Parser as got:
        return got.args[0]
    finally:
        argparse.ArgumentParser.parse_args = real
    raise AssertionError(f"{target} built no parser")


PARSERS = {verb: _parser(target, head) for verb, target, head in _verbs()}
CONFIG_VERBS = {verb: p for verb, p in PARSERS.items() if "--config" in p._option_string_actions}


def _shown(p: argparse.ArgumentParser):
    """The config options --help lists: (action, flags shown)."""
    return [(a, a.option_strings) for a in p._actions if a.option_strings and a.help != argparse.SUPPRESS
            and a.dest not in ("help", "config") and a.default is argparse.SUPPRESS]


def _short_flags(p: argparse.ArgumentParser) -> dict[str, str]:
    """Short flag -> the nested field it sets."""
    return {flags[0]: a.dest.replace("__", ".") for a, flags in _shown(p) if "__" in a.dest and "." not in flags[0]}


# A verb's short flags, as `--help` lists them. A change here is a change of the command line people type: made on
# purpose, visible in review. (dpo and grpo gained --seed for train.seed; pipeline gained --inputs for prepare.inputs;
# pipeline's agent sections took the short forms of the leaves they share with sft and grpo; the tool data's own
# leaves (train, heldout, kinds, thinking, schemas, distractors) stay long there: `--agent-data.train`.)
SHORT_FLAGS = {
    "quickstart": "",
    "data synth": "",
    "data prepare": (
        "--converter --exact --false-negative-weight --fold-fullwidth-alnum --max-blank-lines --max-chars "
        "--max-dup-line-fraction --max-top-ngram-fraction --min-chars --min-cjk-fraction --near --ngram "
        "--num-perm --seed --strip-indent --threshold --to-simplified --too-long --top-ngram-size"
    ),
    "data tokenize": "",
    "data verify": "",
    "data instruct": "",
    "data pairs": "--max-new-tokens --repetition-penalty --seed --stop --temperature --top-k --top-p",
    "data teach": "",
    "data tools": "",
    "tokenizer train": "",
    "pipeline": (
        "--attn-impl --beta --center-coef --chapter-regex --contrast --converter --csv-delimiter --data-weights "
        "--doc-mask --dtype --encoding --eval-tokens --exact --false-negative-weight "
        "--fold-fullwidth-alnum --gguf --gguf-type --glaive --global-batch-tokens --heldout-prompts --hf "
        "--hf-cache-dir --hf-config --hf-split --hidden-size --init-from --inputs --instruct-limit "
        "--intermediate-size --joiner --json-key --judge-endpoint --judge-model --judge-samples --keep-prob "
        "--kto-desirable-weight --kto-undesirable-weight --label-smoothing --loss --lr-sweep "
        "--max-blank-lines --max-chars --max-chunk-chars --max-dup-line-fraction --max-eval-chars --max-heldout "
        "--max-malformed-listed --max-sentence-chars --max-token-length --max-top-ngram-fraction --max-train-mb "
        "--mc-data --mc-limit --mc-shots --mc-split --mc-subjects --min-chars --min-cjk-fraction --min-frequency "
        "--min-sentence-chars --name --near --near-dedup --ngram --num-attention-heads --num-hidden-layers "
        "--num-key-value-heads --num-perm --policy --ppl-tokens --preset --questions --quiet --ref-batch-size "
        "--rope-factor --rope-scaling --rope-theta --round-reference --rounds --sample-temperature "
        "--samples-per-story --sft-weight --shard-tokens --simpo-gamma --sources --stories "
        "--strip-indent --threshold --tie-word-embeddings --to-simplified --too-long --top-ngram-size "
        "--train-eval-pairs --txt-mode --val-fraction --vocab-size --windows --zero-init-residual"
    ),
    "pretrain": (
        "--adam-lr --attn-impl --beta1 --beta2 --compile --decay-fraction --device --distill-alpha "
        "--distill-temperature --doc-mask --eps --eval-batch-size --eval-every --eval-tokens --fsdp "
        "--global-batch-tokens --grad-accum-steps --grad-clip --hidden-size --init-from --intermediate-size "
        "--keep-last --log-every --loss-chunk-size --lr --max-skipped-steps --max-steps --max-tokens "
        "--micro-batch-size --min-lr-ratio --muon-lr --muon-momentum --muon-weight-decay --num-attention-heads "
        "--num-hidden-layers --num-key-value-heads --on-nonfinite --optimizer --overwrite --peak-flops "
        "--precision --prefetch --preset --progress --prompts --resume --resume-from --rope-factor "
        "--rope-scaling --rope-theta --sample-temperature "
        "--sample-tokens --save-every --schedule --seed --seq-len --stop-at-step --teacher --teacher-logits "
        "--tensorboard --tie-word-embeddings --warmup-steps --weight-decay --windows --zero-init-residual"
    ),
    "sft": (
        "--adam-lr --beta1 --beta2 --compile --decay-fraction --device --distill-alpha --distill-temperature "
        "--eps --eval-every --fsdp --grad-accum-steps --grad-clip --keep-last --log-every --loss-chunk-size --lr "
        "--max-skipped-steps --max-steps --max-tokens --micro-batch-size --min-lr-ratio --muon-lr "
        "--muon-momentum --muon-weight-decay --on-nonfinite --optimizer --overwrite --peak-flops --precision --prefetch "
        "--progress --resume --resume-from --save-every --schedule --seed --stop-at-step --teacher --tensorboard "
        "--warmup-steps --weight-decay"
    ),
    "reward": (
        "--adam-lr --beta1 --beta2 --compile --decay-fraction --device --eps --eval-every --fsdp "
        "--grad-accum-steps --grad-clip --keep-last --log-every --lr --max-skipped-steps "
        "--max-steps --max-tokens --micro-batch-size --min-lr-ratio --muon-lr --muon-momentum --muon-weight-decay "
        "--on-nonfinite --optimizer --overwrite --peak-flops --precision --prefetch --progress --resume --resume-from "
        "--save-every --schedule --seed --stop-at-step --tensorboard --warmup-steps --weight-decay"
    ),
    "reward score": "",
    "dpo": (
        "--adam-lr --all-met-bonus --batch-size --beta1 --beta2 --compile --decay-fraction --device --eps "
        "--eval-every --fsdp --grad-accum-steps --grad-clip --greedy --k --keep-last "
        "--limit --log-every --lr --markers --max-new-tokens --max-skipped-steps --max-steps --max-tokens "
        "--micro-batch-size --min-lr-ratio --min-margin --mode --muon-lr --muon-momentum --muon-weight-decay "
        "--on-nonfinite --optimizer --overwrite --peak-flops --precision --prefetch --progress --repetition-penalty "
        "--repetition-weight --resume --resume-from --reward-model --reward-model-weight --save-every --schedule "
        "--scorer --seed --stop --stop-at-step --temperature --tensorboard --top-k --top-p --warmup-steps "
        "--weight-decay --word-credit"
    ),
    "grpo": (
        "--adam-lr --beta1 --beta2 --compile --decay-fraction --device --eps --eval-every --fsdp "
        "--grad-accum-steps --grad-clip --keep-last --log-every --lr --max-new-tokens "
        "--max-skipped-steps --max-steps --micro-batch-size --min-lr-ratio --muon-lr --muon-momentum "
        "--muon-weight-decay --on-nonfinite --optimizer --overwrite --peak-flops --precision --progress --repetition-penalty "
        "--resume --resume-from --save-every --schedule --seed --stop --stop-at-step --temperature --tensorboard "
        "--top-k --top-p --warmup-steps --weight-decay"
    ),
    "data teacher-logits": "",
    "generate": "--max-new-tokens --repetition-penalty --seed --stop --temperature --top-k --top-p",
    "chat": "--max-new-tokens --repetition-penalty --seed --stop --temperature --top-k --top-p",
    "eval ppl": "",
    "eval tools": "",
    "eval instruct": "--max-new-tokens --repetition-penalty --seed --stop --temperature --top-k --top-p",
    "eval mc": "",
    "eval judge": "",
    "eval passkey": "",
    "export hf": "",
    "export gguf": "",
    "quantize": "",
    "serve": "",
}
SHORT_FLAGS["sweep"] = SHORT_FLAGS["pretrain"]  # one PretrainConfig: the same flags

# Short flags claimed with opt(short=...) where the leaf name clashes (dpo/grpo: sampling.seed; pipeline: the
# tokenizer's and tokenize's inputs, which default to prepare's output).
CLAIMED = {"dpo": {"--seed": "train.seed"}, "grpo": {"--seed": "train.seed"}, "pipeline": {"--inputs": "prepare.inputs"}}


def test_every_config_verb_is_pinned():
    assert set(CONFIG_VERBS) == set(SHORT_FLAGS)
    assert "presets" in PARSERS and "presets" not in CONFIG_VERBS  # argparse of its own, no config


@pytest.mark.parametrize("verb", sorted(SHORT_FLAGS))
def test_short_flags_of_each_verb(verb):
    shorts = _short_flags(CONFIG_VERBS[verb])
    assert " ".join(sorted(shorts)) == " ".join(SHORT_FLAGS[verb].split())
    for flag, field in shorts.items():
        expected = CLAIMED.get(verb, {}).get(flag)
        if expected:
            assert field == expected, (flag, field)
        else:  # an automatic short flag is the field's own leaf name, unique in the verb
            assert flag == "--" + field.rsplit(".", 1)[-1].replace("_", "-"), (flag, field)


@pytest.mark.parametrize("verb", sorted(SHORT_FLAGS))
def test_help_shows_each_option_once_in_one_spelling(verb):
    p = CONFIG_VERBS[verb]
    shown = _shown(p)
    dests = [a.dest for a, _f in shown]
    assert len(dests) == len(set(dests)), sorted(d for d in dests if dests.count(d) > 1)
    for a, flags in shown:
        expect = 2 if isinstance(a, argparse.BooleanOptionalAction) else 1  # --x and its --no-x
        assert len(flags) == expect, flags
        assert "_" not in flags[0], flags
    spelt = set(re.findall(r"(?<![\w-])--[\w.-]+", p.format_usage()))  # (help texts may name other verbs' flags)
    assert {f for _a, flags in shown for f in flags} <= spelt
    assert not {s for s in spelt if "_" in s}, sorted(s for s in spelt if "_" in s)
    for flag in spelt:  # no accepted-but-hidden spelling leaks into the usage
        action = p._option_string_actions.get(flag)
        assert action is not None and action.help != argparse.SUPPRESS, flag


def test_every_old_spelling_still_sets_the_same_field():
    p = CONFIG_VERBS["pretrain"]
    for spelling in ("--train.max_steps", "--train.max-steps", "--max-steps", "--max_steps"):
        assert p.parse_args(["--data", "d", spelling, "5"]).train__max_steps == "5", spelling
    for spelling, value in (("--model.tie_word_embeddings", True), ("--no-model.tie_word_embeddings", False),
                            ("--model.tie-word-embeddings", True), ("--no-model.tie-word-embeddings", False),
                            ("--tie-word-embeddings", True), ("--no-tie_word_embeddings", False)):
        assert p.parse_args(["--data", "d", spelling]).model__tie_word_embeddings is value, spelling
    text = p.format_help()
    assert "--tie-word-embeddings" in text and "--model.tie" not in text and "--tie_word" not in text


@pytest.mark.parametrize("verb", ["dpo", "grpo"])
def test_seed_is_the_training_seed_beside_a_sampling_seed(verb):
    p = CONFIG_VERBS[verb]
    seed_of_sampling = "pairs__sampling__seed" if verb == "dpo" else "sampling__seed"
    ns = p.parse_args(["run", "--seed", "7", f"--{seed_of_sampling.replace('__', '.')}", "3"])
    assert ns.train__seed == "7" and getattr(ns, seed_of_sampling) == "3"
    assert p.parse_args(["run", "--train.seed", "8"]).train__seed == "8"  # the dotted form still works


UNUSED = {"dpo": ["train.loss_chunk_size"], "reward": ["train.loss_chunk_size"],
          "grpo": ["train.max_tokens", "train.prefetch", "train.loss_chunk_size"]}


@pytest.mark.parametrize("verb", sorted(UNUSED))
def test_an_option_the_verb_does_not_use_is_hidden_and_refused_in_one_line(verb, tmp_path, capsys):
    text = CONFIG_VERBS[verb].format_help()
    for field in UNUSED[verb]:
        dashed = field.replace("_", "-")
        leaf = "--" + dashed.rsplit(".", 1)[-1]
        assert leaf not in text and f"--{dashed}" not in text, field
        for spelling in (f"--{dashed}", f"--{field}"):
            assert cli.main([verb, str(tmp_path / "run"), spelling, "8"]) == 2
            err = capsys.readouterr().err
            assert err == f"xiaolm: error: --{dashed} is not used by xiaolm {verb}\n", err
        recipe = tmp_path / "r.yaml"
        section, key = field.split(".")
        recipe.write_text(f"{section}:\n  {key}: 8\n", encoding="utf-8")
        assert cli.main([verb, str(tmp_path / "run"), "--config", str(recipe)]) == 2
        err = capsys.readouterr().err
        assert err == f"xiaolm: error: {recipe}: {field} is not used by xiaolm {verb} (remove it)\n", err
    assert "--loss-chunk-size" in CONFIG_VERBS["pretrain"].format_help()  # used there: listed


def test_a_replayed_config_with_the_unused_fields_at_their_defaults_is_accepted(tmp_path, capsys):
    recipe = tmp_path / "config.yaml"  # as a run writes it: every field, unused ones at their defaults
    recipe.write_text("train:\n  max_tokens: null\n  prefetch: 0\n  loss_chunk_size: 0\n", encoding="utf-8")
    assert cli.main(["grpo", str(tmp_path / "run"), "--config", str(recipe)]) == 2  # fails later: no prompts
    err = capsys.readouterr().err
    assert "not used" not in err and "--prompts" in err, err


def test_unused_must_name_fields():
    @dataclasses.dataclass
    class C:
        a: int = opt(1, "a")

    with pytest.raises(ValueError, match="nope"):
        add_config_args(argparse.ArgumentParser(), C, unused={"nope"})
