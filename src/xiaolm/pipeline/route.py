"""``xiaolm pipeline --config RECIPE.yaml``: the whole route, from raw text to an exported chat model and a report.

prepare -> tokenizer -> tokenize -> pretrain -> instruct -> sft -> (pairs -> reward -> align: DPO or GRPO) -> (agent:
tool data -> tool SFT -> GRPO with tools -> eval tools, see ``agent.py``) -> eval -> export -> report. A recipe
holds one section per stage with exactly the options of that stage's own verb, plus a ``workdir``; outputs are
wired together unless the recipe names them. Each stage writes its resolved options to ``WORKDIR/configs/STAGE.yaml``
and the report names the command that replays it alone.

Resumable by stage: a rerun skips a stage whose fingerprint (options + upstream fingerprints + external inputs, see
``state.py``) is unchanged and whose outputs exist; resumes an interrupted training stage from its last checkpoint
(exactly: batches are a pure function of the step); and reruns a changed stage and, through the fingerprints,
everything after it.

    xiaolm pipeline --config configs/tinystories-zh.yaml
    xiaolm pipeline --config configs/general-zh-local.yaml --dry-run
    xiaolm pipeline --config configs/general-zh-local.yaml --from sft
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from xiaolm.align.dpo import DPOConfig
from xiaolm.align.grpo import GRPOConfig
from xiaolm.align.onpolicy import PairsConfig
from xiaolm.align.reward import RewardConfig
from xiaolm.config import opt, parse_config, save_config
from xiaolm.data.prepare import PrepareConfig
from xiaolm.data.shards import TokenizeConfig
from xiaolm.data.vocab import TokenizerTrainConfig
from xiaolm.eval.tools import EvalToolsConfig
import xiaolm.pipeline.agent as agent_stage
from xiaolm.pipeline.distill import DistillStage, run_distill, student_configs
from xiaolm.pipeline.mix import CorpusSource, InstructMixConfig
from xiaolm.pipeline.paths import final_run, instruct_dir
from xiaolm.pipeline.state import StageState, compact, fingerprint, peak_memory
from xiaolm.tasks.agent import ToolDataConfig
from xiaolm.tasks.instruct import InstructConfig
from xiaolm.train.pretrain import PretrainConfig
from xiaolm.train.sft import SFTConfig
from xiaolm.rundir import lock_run_dir
from xiaolm.utils import atomic_write_json, fail, log

STAGES = ("prepare", "tokenizer", "tokenize", "pretrain", "distill", "instruct", "sft", "pairs", "reward", "align",
          *agent_stage.AGENT_STAGES, "eval", "export", "report")

QUESTIONS = ["中国的首都是哪里？", "请介绍一下长城。", "怎样才能睡得更好？", "什么是光合作用？", "给我讲一个关于小猫的故事。"]


@dataclass
class EvalSection:
    device: str = opt("auto", "auto, cpu, cuda or mps")
    ppl_tokens: int = opt(65536, "held-out tokens for the bits-per-character of the base and the final model")
    instruct_limit: int = opt(64, "held-out instructions for the instruction-following table (0: skip)")
    max_new_tokens: int = opt(160, "answer length in the instruction eval and the questions (greedy)")
    batch_size: int = opt(16, "prompts generated (or MC questions scored) together")
    mc_data: Optional[str] = opt(None, "C-Eval / CMMLU style CSV directory for multiple-choice accuracy (none: skip)")
    mc_split: str = opt("test", "subfolder of mc_data to evaluate")
    mc_subjects: list[str] = opt([], "only these subjects (CSV names without .csv; empty: all)")
    mc_limit: Optional[int] = opt(20, "questions per subject at most")
    mc_shots: int = opt(0, "worked dev examples before each question")
    questions: list[str] = opt(QUESTIONS, "questions the final model answers in the report (greedy)")
    repetition_penalty: float = opt(1.1, "repetition penalty of those answers (the instruction eval uses none)")
    judge_endpoint: Optional[str] = opt(None, "OpenAI-compatible endpoint (.../v1) of a judge model that grades the "
                                              "pretrained model's stories (xiaolm eval judge; none: skip)")
    judge_model: Optional[str] = opt(None, "the judge's model name (key: $XIAOLM_JUDGE_API_KEY or $OPENAI_API_KEY)")
    judge_samples: int = opt(1, "completions per held-out opening graded by the judge")


@dataclass
class ExportSection:
    hf: bool = opt(True, "write a Hugging Face LlamaForCausalLM directory to WORKDIR/export/hf")
    gguf: bool = opt(True, "write WORKDIR/export/model.gguf (+ Ollama Modelfile)")
    dtype: Literal["float32", "bfloat16", "float16"] = opt("float32", "dtype of the Hugging Face weights")
    gguf_type: Literal["f32", "f16", "q8_0", "q4_0"] = opt("f16", "tensor type of the GGUF file")
    name: Optional[str] = opt(None, "model name in the model card and GGUF (default: the workdir's name)")


@dataclass
class PipelineConfig:
    """Run a whole route from one recipe: prepare -> tokenizer -> tokenize -> pretrain -> instruct -> sft -> (pairs \
-> reward -> align) -> eval -> export -> report (see configs/*.yaml). Every stage's options are available as \
--STAGE.OPTION. A rerun skips finished stages, resumes an interrupted one, and redoes a stage (and those after it) \
whose options or inputs changed."""

    workdir: str = opt("runs/pipeline", "directory for every stage's output, the state files and REPORT.md")
    stages: list[str] = opt(list(STAGES), "stages to run, in order (others are used as they are): "
                                          + ", ".join(STAGES))
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    mix: list[CorpusSource] = opt([], "pretraining sources mixed at the prepare stage, each prepared with its own "
                                      "options and weighted (empty: prepare.inputs as one corpus)")
    tokenizer: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    distill: DistillStage = field(default_factory=DistillStage)
    instruct: InstructConfig = field(default_factory=InstructConfig)
    instruct_mix: InstructMixConfig = field(default_factory=InstructMixConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    align: Literal["none", "dpo", "grpo"] = opt("none", "alignment after SFT: none, dpo (on pairs) or grpo")
    reward_model: bool = opt(False, "train a reward model on the pairs (reported; used by GRPO's reward when set)")
    pairs: PairsConfig = field(default_factory=PairsConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    agent: Literal["none", "sft", "base"] = opt("none", "agent stages: tool data, tool SFT from the route's sft "
                                                         "(or base) model, GRPO with tools, eval tools (none: off)")
    agent_data: ToolDataConfig = field(default_factory=ToolDataConfig)
    agent_sft: SFTConfig = field(default_factory=SFTConfig)
    agent_grpo: GRPOConfig = field(default_factory=lambda: GRPOConfig(task="tools"))
    agent_eval: EvalToolsConfig = field(default_factory=EvalToolsConfig)
    eval: EvalSection = field(default_factory=EvalSection)
    export: ExportSection = field(default_factory=ExportSection)


# --------------------------------------------------------------------------------------------------- wiring


def wire(cfg: PipelineConfig) -> PipelineConfig:
    """Fill each stage's inputs and outputs from the previous stage's, where the recipe leaves them empty."""
    w = Path(cfg.workdir)
    cfg.prepare.out = cfg.prepare.out or str(w / "data")
    cfg.tokenizer.inputs = cfg.tokenizer.inputs or [cfg.prepare.out]
    cfg.tokenizer.out = cfg.tokenizer.out or str(w / "tokenizer")
    cfg.tokenize.inputs = cfg.tokenize.inputs or [cfg.prepare.out]
    cfg.tokenize.tokenizer = cfg.tokenize.tokenizer or cfg.tokenizer.out
    cfg.tokenize.out = cfg.tokenize.out or str(w / "shards")
    cfg.pretrain.data = cfg.pretrain.data or cfg.tokenize.out
    cfg.pretrain.tokenizer = cfg.pretrain.tokenizer or cfg.tokenizer.out
    if cfg.pretrain.out == PretrainConfig().out:
        cfg.pretrain.out = str(w / "run")
    instruct_dir = str(w / "instruct")
    if cfg.instruct_mix.sources:
        cfg.instruct_mix.out = cfg.instruct_mix.out or instruct_dir
        instruct_dir = cfg.instruct_mix.out
    else:
        if cfg.instruct.out == InstructConfig().out:
            cfg.instruct.out = instruct_dir
        instruct_dir = cfg.instruct.out
        if not cfg.instruct.stories:
            cfg.instruct.stories = _story_files(cfg)
    cfg.sft.run = cfg.sft.run or cfg.pretrain.out
    cfg.sft.data = cfg.sft.data or [instruct_dir]
    if cfg.sft.out == SFTConfig().out:
        cfg.sft.out = str(w / "sft")
    if cfg.pairs.out == PairsConfig().out:
        cfg.pairs.out = str(w / "pairs" / "pairs.jsonl")
    if not cfg.pairs.data:
        cfg.pairs.policy = cfg.pairs.policy or cfg.sft.out
        cfg.pairs.prompts = cfg.pairs.prompts or [instruct_dir]
    cfg.reward.run = cfg.reward.run or cfg.sft.out
    cfg.reward.data = cfg.reward.data or [cfg.pairs.out]
    if cfg.reward.out == RewardConfig().out:
        cfg.reward.out = str(w / "reward")
    cfg.dpo.run = cfg.dpo.run or cfg.sft.out
    cfg.dpo.data = cfg.dpo.data or [cfg.pairs.out]
    if cfg.dpo.out == DPOConfig().out:
        cfg.dpo.out = str(w / "dpo")
    cfg.grpo.run = cfg.grpo.run or cfg.sft.out
    cfg.grpo.prompts = cfg.grpo.prompts or [instruct_dir]
    if cfg.grpo.out == GRPOConfig().out:
        cfg.grpo.out = str(w / "grpo")
    if cfg.reward_model and cfg.align == "grpo" and not cfg.grpo.reward_model:
        cfg.grpo.reward_model = cfg.reward.out
    heldout = str(Path(instruct_dir) / "heldout.jsonl")
    if cfg.align == "dpo" and not cfg.dpo.eval_prompts and not cfg.instruct_mix.sources:
        cfg.dpo.eval_prompts = [heldout]
    if cfg.align == "grpo" and not cfg.grpo.eval_prompts and not cfg.instruct_mix.sources:
        cfg.grpo.eval_prompts = [heldout]
    agent_stage.wire_agent(cfg)
    return cfg


def _story_files(cfg: PipelineConfig) -> list[str]:
    """Stories for `data instruct`: the raw local inputs (they keep TinyStories' features), else the prepared corpus."""
    inputs = cfg.prepare.inputs
    if inputs and not cfg.mix and all(not i.startswith("hf:") and Path(i).exists() for i in inputs):
        files: list[str] = []
        for i in inputs:
            p = Path(i)
            files += [str(q) for q in sorted(p.rglob("*.json*"))] if p.is_dir() else [str(p)]
        if files:
            return files
    cfg.instruct.field = "text"
    return [str(Path(cfg.prepare.out) / "train.jsonl"), str(Path(cfg.prepare.out) / "val.jsonl")]


# --------------------------------------------------------------------------------------------------- stages


@dataclass
class Stage:
    name: str
    verb: str                                   # the verb that replays it: `xiaolm VERB ... --config FILE`
    options: Callable[[PipelineConfig], Any]    # what is fingerprinted and saved as its config
    upstream: Callable[[PipelineConfig], list[str]]
    inputs: Callable[[PipelineConfig], list[str]]
    outputs: Callable[[PipelineConfig], list[Path]]   # must all exist for the stage to count as done
    clean: Callable[[PipelineConfig], list[Path]]     # removed before a (re)run from scratch
    run: Callable[[PipelineConfig, bool], dict]
    applies: Callable[[PipelineConfig], bool] = lambda cfg: True
    training: bool = False
    positionals: Callable[[PipelineConfig], list[str]] = lambda cfg: []


def _run_prepare(cfg: PipelineConfig, resume: bool) -> dict:
    from xiaolm.data import prepare as prepare_mod
    from xiaolm.data.readers import InputError
    from xiaolm.pipeline.mix import mix_corpus

    try:
        if not cfg.mix:
            if not cfg.prepare.inputs:
                raise fail("prepare.inputs is empty: name files, directories, globs or hf:NAME datasets")
            return prepare_mod.prepare(cfg.prepare.inputs, cfg.prepare.out, cfg.prepare)
        parts, reports = [], {}
        for src in cfg.mix:
            if not src.name or not src.inputs:
                raise fail("every mix source needs a name and inputs")
            folder = Path(cfg.prepare.out) / "sources" / src.name
            log(f"-- source {src.name}: {', '.join(src.inputs)}")
            source_cfg = prepare_mod.apply_overrides(cfg.prepare, src.options)
            reports[src.name] = prepare_mod.prepare(src.inputs, folder, source_cfg)
            parts.append((src.name, folder, src.weight, src.max_docs))
        mixed = mix_corpus(parts, Path(cfg.prepare.out))
        for name, rep in reports.items():
            mixed["mixture"][name]["prepare"] = {k: rep.get(k) for k in ("documents_in", "documents_kept",
                                                                          "duplicates_exact", "duplicates_near")}
        mixed["documents_in"] = sum(r.get("documents_in", 0) for r in reports.values())
        mixed["documents_kept"] = sum(r.get("documents_kept", 0) for r in reports.values())  # before weighting
        atomic_write_json(Path(cfg.prepare.out) / "report.json", mixed)
        return mixed
    except InputError as exc:
        raise fail(str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise fail(f"prepare: {exc}") from None


def _run_tokenizer(cfg: PipelineConfig, resume: bool) -> dict:
    from xiaolm.data import vocab as vocab_mod

    tok = vocab_mod.run(cfg.tokenizer)
    report = Path(tok.path) / "report.json"
    out = {"path": str(tok.path), "vocab_size": tok.vocab_size}
    if report.is_file():
        out.update({k: v for k, v in json.loads(report.read_text()).items() if isinstance(v, (int, float, str))})
    return out


def _run_tokenize(cfg: PipelineConfig, resume: bool) -> dict:
    from xiaolm.data import shards as shards_mod

    return shards_mod.run(cfg.tokenize)


def _training(fn, section, resume: bool) -> dict:
    section.train.resume = resume
    return fn(section)


def _run_pretrain(cfg: PipelineConfig, resume: bool) -> dict:
    from xiaolm.train.pretrain import pretrain

    return _training(pretrain, cfg.pretrain, resume)


def _run_instruct(cfg: PipelineConfig, resume: bool) -> dict:
    if cfg.instruct_mix.sources:
        from xiaolm.pipeline.mix import mix_instructions

        return mix_instructions(cfg.instruct_mix, Path(cfg.instruct_mix.out))
    from xiaolm.tasks.instruct import build_instruct

    return build_instruct(cfg.instruct)


def _run_sft(cfg: PipelineConfig, resume: bool) -> dict:
    from xiaolm.train.sft import sft

    return _training(sft, cfg.sft, resume)


def _run_pairs(cfg: PipelineConfig, resume: bool) -> dict:
    from xiaolm.align import onpolicy as pairs_mod
    from xiaolm.pipeline.mix import materialise_hf

    path = Path(cfg.workdir) / "configs" / "pairs.yaml"
    if any(d.startswith("hf:") for d in cfg.pairs.data):
        folder = Path(cfg.pairs.out).parent / "sources"
        cfg.pairs.data = [str(materialise_hf(d, folder)) if d.startswith("hf:") else d for d in cfg.pairs.data]
        _save_stage_config(cfg.pairs, path)
    code = pairs_mod.main(["--config", str(path)])
    if code:
        raise fail(f"the pairs stage failed (exit code {code})", code=code)
    out = Path(cfg.pairs.out)
    return json.loads(out.with_name(out.name + ".report.json").read_text(encoding="utf-8"))


def _run_reward(cfg: PipelineConfig, resume: bool) -> dict:
    from xiaolm.align.reward import train_reward

    return _training(train_reward, cfg.reward, resume)


def _run_align(cfg: PipelineConfig, resume: bool) -> dict:
    if cfg.align == "dpo":
        from xiaolm.align.dpo import dpo

        return _training(dpo, cfg.dpo, resume)
    from xiaolm.align.grpo import grpo

    return _training(grpo, cfg.grpo, resume)


def _align_section(cfg: PipelineConfig):
    return cfg.dpo if cfg.align == "dpo" else cfg.grpo


def _uses_pairs(cfg: PipelineConfig) -> bool:
    return cfg.align == "dpo" or cfg.reward_model


def _run_eval(cfg: PipelineConfig, resume: bool) -> dict:
    from xiaolm.pipeline.evaluate import evaluate_route

    return evaluate_route(cfg)


def _run_export(cfg: PipelineConfig, resume: bool) -> dict:
    from xiaolm.export.gguf import export_gguf
    from xiaolm.export.hf import export_hf

    e, out, run = cfg.export, Path(cfg.workdir) / "export", final_run(cfg)
    name = e.name or Path(cfg.workdir).name
    result: dict = {"model": run}
    if e.hf:
        result["hf"] = str(export_hf(run, out / "hf", dtype=e.dtype, chat=True, name=name))
    if e.gguf:
        g = export_gguf(run, out / "model.gguf", ftype=e.gguf_type, chat=True, name=name)
        result["gguf"] = {k: v for k, v in g.items() if isinstance(v, (int, float, str))}
    atomic_write_json(out / "export.json", result)
    return result


def _workdir(cfg, *parts) -> Path:
    return Path(cfg.workdir).joinpath(*parts)


def _sum(cfg_path: str) -> list[Path]:
    return [Path(cfg_path) / "summary.json"]


def _mc_inputs(cfg: PipelineConfig) -> list[str]:
    return [cfg.eval.mc_data] if cfg.eval.mc_data else []


def _pairs_inputs(cfg: PipelineConfig) -> list[str]:
    return list(cfg.pairs.data)


STAGE_TABLE: dict[str, Stage] = {s.name: s for s in [
    Stage("prepare", "data prepare", lambda c: {"prepare": c.prepare, "mix": c.mix} if c.mix else c.prepare,
          lambda c: [],
          lambda c: [i for s in c.mix for i in s.inputs] if c.mix else list(c.prepare.inputs),
          lambda c: [Path(c.prepare.out) / "train.jsonl", Path(c.prepare.out) / "report.json"],
          lambda c: [Path(c.prepare.out)], _run_prepare, positionals=lambda c: list(c.prepare.inputs)),
    Stage("tokenizer", "tokenizer train", lambda c: c.tokenizer, lambda c: ["prepare"], lambda c: [],
          lambda c: [Path(c.tokenizer.out) / "tokenizer.json"], lambda c: [Path(c.tokenizer.out)], _run_tokenizer,
          positionals=lambda c: list(c.tokenizer.inputs)),
    Stage("tokenize", "data tokenize", lambda c: c.tokenize, lambda c: ["prepare", "tokenizer"], lambda c: [],
          lambda c: [Path(c.tokenize.out) / "meta.json"], lambda c: [Path(c.tokenize.out)], _run_tokenize,
          positionals=lambda c: list(c.tokenize.inputs)),
    Stage("pretrain", "pretrain", lambda c: c.pretrain, lambda c: ["tokenizer", "tokenize"], lambda c: [],
          lambda c: _sum(c.pretrain.out), lambda c: [Path(c.pretrain.out)], _run_pretrain, training=True),
    Stage("distill", "pipeline", lambda c: {"distill": c.distill, "students": student_configs(c)},
          lambda c: ["tokenize"] + (["pretrain"] if c.distill.teacher == "route" else []),
          lambda c: [] if c.distill.teacher == "route" else [c.distill.teacher],
          lambda c: [_workdir(c, "distill", "distill.json")], lambda c: [_workdir(c, "distill")], run_distill,
          applies=lambda c: c.distill.enabled, training=True),
    Stage("instruct", "data instruct", lambda c: c.instruct_mix if c.instruct_mix.sources else c.instruct,
          lambda c: ["prepare"] if not c.instruct_mix.sources and any(Path(s).parent == Path(c.prepare.out)
                                                                       for s in c.instruct.stories) else [],
          lambda c: ([i for s in c.instruct_mix.sources for i in s.inputs] if c.instruct_mix.sources else
                     [s for s in c.instruct.stories if Path(s).parent != Path(c.prepare.out)]),
          lambda c: [instruct_dir(c) / "train.jsonl"], lambda c: [instruct_dir(c)], _run_instruct,
          positionals=lambda c: [] if c.instruct_mix.sources else list(c.instruct.stories)),
    Stage("sft", "sft", lambda c: c.sft, lambda c: ["pretrain", "instruct"], lambda c: [],
          lambda c: _sum(c.sft.out), lambda c: [Path(c.sft.out)], _run_sft, training=True,
          positionals=lambda c: [c.sft.run]),
    Stage("pairs", "data pairs", lambda c: c.pairs, lambda c: [] if c.pairs.data else ["sft", "instruct"],
          _pairs_inputs, lambda c: [Path(c.pairs.out)], lambda c: [Path(c.pairs.out).parent], _run_pairs,
          applies=_uses_pairs),
    Stage("reward", "reward", lambda c: c.reward, lambda c: ["sft", "pairs"], lambda c: [],
          lambda c: _sum(c.reward.out), lambda c: [Path(c.reward.out)], _run_reward,
          applies=lambda c: c.reward_model, training=True, positionals=lambda c: [c.reward.run]),
    Stage("align", "dpo", lambda c: {"method": c.align, "options": _align_section(c)},
          lambda c: ["sft", "instruct"] + (["pairs"] if c.align == "dpo" else [])
          + (["reward"] if c.reward_model and c.align == "grpo" else []), lambda c: [],
          lambda c: _sum(final_run(c)), lambda c: [Path(final_run(c))], _run_align,
          applies=lambda c: c.align != "none", training=True, positionals=lambda c: [_align_section(c).run]),
    Stage("agent_data", "data tools", lambda c: c.agent_data, lambda c: [], lambda c: [],
          lambda c: [Path(c.agent_data.out) / "report.json"], lambda c: [Path(c.agent_data.out)],
          agent_stage.run_agent_data, applies=agent_stage.agent_on),
    Stage("agent_sft", "sft", lambda c: c.agent_sft, agent_stage.sft_upstream, lambda c: [],
          lambda c: _sum(c.agent_sft.out), lambda c: [Path(c.agent_sft.out)], agent_stage.run_agent_sft,
          applies=agent_stage.agent_on, training=True, positionals=lambda c: [c.agent_sft.run]),
    Stage("agent_grpo", "grpo", lambda c: c.agent_grpo, lambda c: ["agent_data", "agent_sft"], lambda c: [],
          lambda c: _sum(c.agent_grpo.out), lambda c: [Path(c.agent_grpo.out)], agent_stage.run_agent_grpo,
          applies=agent_stage.agent_on, training=True, positionals=lambda c: [c.agent_grpo.run]),
    Stage("agent_eval", "pipeline", lambda c: c.agent_eval, lambda c: ["agent_data", "agent_sft", "agent_grpo"],
          lambda c: [], lambda c: [agent_stage.eval_dir(c) / "eval.json"], lambda c: [agent_stage.eval_dir(c)],
          agent_stage.run_agent_eval, applies=agent_stage.agent_on),
    Stage("eval", "pipeline", lambda c: c.eval,
          lambda c: ["tokenize", "pretrain", "instruct", "sft"] + (["align"] if c.align != "none" else []),
          _mc_inputs, lambda c: [_workdir(c, "eval", "eval.json")], lambda c: [_workdir(c, "eval")], _run_eval),
    Stage("export", "export", lambda c: c.export, lambda c: ["align" if c.align != "none" else "sft"],
          lambda c: [], lambda c: [_workdir(c, "export", "export.json")], lambda c: [_workdir(c, "export")],
          _run_export),
]}


def stage_options(cfg: PipelineConfig, name: str):
    if name == "align":
        return _align_section(cfg)
    return STAGE_TABLE[name].options(cfg)


def command_for(cfg: PipelineConfig, name: str) -> str:
    """The command that replays one stage alone (its resolved options are in WORKDIR/configs/STAGE.yaml)."""
    conf = Path(cfg.workdir) / "configs" / f"{name}.yaml"
    if (name in ("distill", "eval", "agent_eval", "report") or (name == "prepare" and cfg.mix)
            or (name == "instruct" and cfg.instruct_mix.sources)):
        return f"xiaolm pipeline --config {Path(cfg.workdir) / 'pipeline.yaml'} --from {name} --stages {name}"
    if name == "export":
        e, run = cfg.export, final_run(cfg)
        out = Path(cfg.workdir) / "export"
        return (f"xiaolm export hf {run} {out / 'hf'} --dtype {e.dtype} --chat && "
                f"xiaolm export gguf {run} {out / 'model.gguf'} --type {e.gguf_type} --chat")
    st = STAGE_TABLE[name]
    verb = ("grpo" if cfg.align == "grpo" else "dpo") if name == "align" else st.verb
    pos = " ".join(st.positionals(cfg))
    return f"xiaolm {verb} {pos + ' ' if pos else ''}--config {conf}"


# --------------------------------------------------------------------------------------------------- planning


def plan(cfg: PipelineConfig, from_stage: Optional[str] = None, force: bool = False) -> list[dict]:
    """Each stage with its fingerprint and what a run would do: skip (done), resume, rerun, run, or leave."""
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise fail(f"unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
    if from_stage is not None and from_stage not in STAGES:
        raise fail(f"--from {from_stage}: not a stage; stages are {', '.join(STAGES)}")
    fps: dict[str, str] = {}
    rows = []
    work = Path(cfg.workdir)
    from_index = STAGES.index(from_stage) if from_stage else None
    for i, name in enumerate(STAGES):
        if name == "report":
            rows.append({"stage": "report", "action": "run", "why": "always rewritten", "fingerprint": "-"})
            continue
        st = STAGE_TABLE[name]
        if not st.applies(cfg):
            rows.append({"stage": name, "action": "off", "why": "not asked for by the recipe", "fingerprint": "-"})
            continue
        up = {u: fps[u] for u in st.upstream(cfg) if u in fps}
        fp = fingerprint(name, stage_options(cfg, name), up, st.inputs(cfg))
        fps[name] = fp
        state = StageState(work, name).read() or {}
        same = state.get("fingerprint") == fp
        outputs_ok = all(p.exists() for p in st.outputs(cfg))
        selected = name in cfg.stages and (from_index is None or i >= from_index)
        if not selected:
            action, why = "leave", ("not selected; done" if same and state.get("status") == "done" else
                                    "not selected; its outputs are used as they are")
        elif (from_index is not None and i == from_index) or force:
            action, why = "rerun", "forced (--from / --force)"
        elif same and state.get("status") == "done" and outputs_ok:
            action, why = "skip", "done; options and inputs unchanged"
        elif same and state.get("status") == "running" and st.training:
            action, why = "resume", "interrupted; continues from its last checkpoint"
        elif state and not same:
            action, why = "rerun", "options, inputs or an earlier stage changed"
        elif state:
            action, why = "rerun", "outputs missing" if state.get("status") == "done" else "did not finish"
        else:
            action, why = "run", "not run yet"
        rows.append({"stage": name, "action": action, "why": why, "fingerprint": fp})
    # A stage rerun because it was forced changes nothing upstream, but everything after it must follow.
    forced = False
    for row in rows:
        if row["action"] == "rerun" and row["why"].startswith("forced"):
            forced = True
        elif forced and row["action"] in ("skip", "resume"):
            row["action"], row["why"] = "rerun", "an earlier stage reruns"
    return rows


def print_plan(rows: list[dict], cfg: PipelineConfig, file=None) -> None:
    file = file or sys.stdout
    print(f"pipeline plan for {cfg.workdir}:", file=file)
    print(f"  {'stage':<10} {'action':<7} {'fingerprint':<17} why / command", file=file)
    for r in rows:
        cmd = command_for(cfg, r["stage"]) if r["stage"] != "report" and r["action"] != "off" else ""
        print(f"  {r['stage']:<10} {r['action']:<7} {r['fingerprint']:<17} {r['why']}", file=file)
        if cmd and r["action"] in ("run", "rerun", "resume"):
            print(f"  {'':<36} {cmd}", file=file)


# --------------------------------------------------------------------------------------------------- running


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _quiet(cfg: PipelineConfig) -> None:
    """Progress bars off: the pipeline's log is read from files and CI logs more often than watched."""
    cfg.tokenizer.progress = cfg.tokenize.progress = False
    for section in (cfg.pretrain, cfg.sft, cfg.reward, cfg.dpo, cfg.grpo, cfg.agent_sft, cfg.agent_grpo):
        section.train.progress = False


def run_pipeline(cfg: PipelineConfig, from_stage: Optional[str] = None, dry_run: bool = False,
                 force: bool = False) -> dict:
    cfg = wire(cfg)
    rows = plan(cfg, from_stage, force)
    if dry_run:
        print_plan(rows, cfg)
        return {"workdir": cfg.workdir, "plan": rows}
    work = Path(cfg.workdir)
    lock_run_dir(work, "pipeline")  # one pipeline per work directory; each training stage also claims its run
    save_config(cfg, work / "pipeline.yaml")
    print_plan(rows, cfg, file=sys.stderr)
    results: dict = {}
    code = 0
    for row in rows:
        name = row["stage"]
        if name == "report" or row["action"] in ("off", "leave", "skip"):
            continue
        st = STAGE_TABLE[name]
        state = StageState(work, name)
        resume = row["action"] == "resume"
        if not resume:
            for p in st.clean(cfg):
                if p.exists() and _inside(p, work):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        _save_stage_config(stage_options(cfg, name), work / "configs" / f"{name}.yaml")
        command = command_for(cfg, name)
        state.started(row["fingerprint"], command)
        log(f"\n== pipeline stage: {name} ({row['action']}: {row['why']})")
        t = time.perf_counter()
        result = st.run(cfg, resume)
        wall = round(time.perf_counter() - t, 1)
        results[name] = result
        if isinstance(result, dict) and result.get("interrupted"):
            code = int(result.get("exit_code") or 130)
            log(f"pipeline: {name} was interrupted; rerun the same command to resume it")
            break
        state.finished(row["fingerprint"], {"wall_s": wall, "command": command, "memory": peak_memory(),
                                            "result": compact(result)})
    if "report" in cfg.stages:
        from xiaolm.pipeline.report import write_report

        write_report(cfg, rows, command_for)
    return {"workdir": cfg.workdir, "plan": rows, "results": results, "exit_code": code}


def _save_stage_config(options: Any, path: Path) -> None:
    if dataclasses.is_dataclass(options):
        save_config(options, path)
        return
    import yaml

    from xiaolm.pipeline.state import _plain
    from xiaolm.utils import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(_plain(options), allow_unicode=True, sort_keys=False))


def main(argv: list[str]) -> int:
    def extra(parser):
        parser.add_argument("--from", dest="from_stage", metavar="STAGE",
                            help="rerun this stage and every stage after it (earlier ones are used as they are)")
        parser.add_argument("--dry-run", action="store_true", help="print the plan with each stage's state; run nothing")
        parser.add_argument("--force", action="store_true", help="rerun the selected stages even when up to date")

    cfg, args = parse_config(
        PipelineConfig, argv, "xiaolm pipeline",
        extra=extra,
    )
    if not args.dry_run:
        _quiet(cfg)
    summary = run_pipeline(cfg, args.from_stage, args.dry_run, args.force)
    if not args.dry_run:
        print(f"\npipeline: report in {Path(cfg.workdir) / 'REPORT.md'}", file=sys.stdout)
    return int(summary.get("exit_code", 0))
