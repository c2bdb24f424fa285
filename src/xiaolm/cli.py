"""The ``xiaolm`` command: one verb per stage.

Verbs are listed here with a one-line summary and the ``module:function`` that runs them, and imported only when
called, so ``xiaolm --help`` is instant and a verb's heavy imports (torch, transformers) cost nothing elsewhere.
Each target takes the remaining argument list and returns an exit code.
"""
from __future__ import annotations

import importlib
import os
import sys

# verb -> (summary, "module:function") or verb -> {subverb: (summary, target)}
VERBS: dict[str, object] = {
    "quickstart": ("synthesise stories, train a tokenizer and a small model, and show what it writes", "xiaolm.quickstart:main"),
    "data": {
        "synth": ("generate the built-in Chinese children's-story corpus", "xiaolm.data.synth:main"),
        "prepare": ("ingest, clean, filter, deduplicate and split raw text", "xiaolm.data.prepare:main"),
        "tokenize": ("encode documents into memory-mapped token shards, in parallel", "xiaolm.data.shards:main"),
        "verify": ("check token shards: sizes, sha256 checksums, ids within the vocabulary", "xiaolm.data.shards:verify_main"),
        "instruct": ("build instruction data with checkable constraints from story records", "xiaolm.tasks.instruct:main"),
        "pairs": ("build preference pairs: load common layouts or sample on-policy", "xiaolm.align.onpolicy:main"),
        "teach": ("instruction data from a teacher model at any OpenAI-compatible endpoint", "xiaolm.data.teach:main"),
        "teacher-logits": ("a teacher's top-k log-probabilities beside token shards, for offline distillation",
                           "xiaolm.data.teacher_logits:main"),
        "tools": ("build verifiable tool-use data (calculator, dates, units, a city table; held-out split)", "xiaolm.tasks.agent:main"),
    },
    "tokenizer": {
        "train": ("train a byte-level BPE tokenizer on a corpus", "xiaolm.data.vocab:main"),
    },
    "pipeline": ("the whole route from one recipe: data -> pretrain -> SFT -> DPO -> eval -> export -> report",
                 "xiaolm.pipeline:main"),
    "presets": ("list the model presets with their parameter counts", "xiaolm.model.presets:presets_main"),
    "pretrain": ("pretrain a model on token shards (one device or torchrun)", "xiaolm.train.pretrain:main"),
    "sweep": ("short pretraining trials at several learning rates; names the best", "xiaolm.train.pretrain:sweep_main"),
    "sft": ("supervised fine-tuning on chat data, full or LoRA", "xiaolm.train.sft:main"),
    "reward": ("train a reward model (or `xiaolm reward score` to score responses)", "xiaolm.align.reward:main"),
    "dpo": ("direct preference optimisation: dpo, ipo, simpo, orpo, kto", "xiaolm.align.dpo:main"),
    "grpo": ("group-relative policy optimisation with verifiable rewards", "xiaolm.align.grpo:main"),
    "generate": ("continue a prompt with a trained model", "xiaolm.infer.generate:main"),
    "chat": ("talk to a chat model in the terminal", "xiaolm.infer.chat:main"),
    "eval": {
        "ppl": ("loss, perplexity and bits per character on text or shards", "xiaolm.eval.ppl:main"),
        "instruct": ("instruction-following and repetition scores on held-out instructions", "xiaolm.eval.instruct:main"),
        "tools": ("tool use on held-out tool tasks (calls, arguments, answers; without tools for contrast)", "xiaolm.eval.tools:main"),
        "mc": ("multiple-choice accuracy (C-Eval / CMMLU CSV) by answer likelihood", "xiaolm.eval.mc:main"),
        "judge": ("stories graded by a judge model (TinyStories' rubric, in Chinese) beside the corpus's own",
                  "xiaolm.eval.judge:main"),
    },
    "export": {
        "hf": ("write a Hugging Face LlamaForCausalLM directory", "xiaolm.export.hf:main"),
        "gguf": ("write a GGUF file for llama.cpp / Ollama", "xiaolm.export.gguf:main"),
    },
    "quantize": ("weight-only int8 / int4 quantisation", "xiaolm.infer.quantize:main"),
    "serve": ("OpenAI-compatible HTTP server with a web chat page", "xiaolm.serve.main:main"),
}


def _usage(table: dict, prefix: str) -> str:
    width = max(len(k) for k in table) + 2
    lines = [f"usage: {prefix} VERB [options]   ({prefix} VERB --help for a verb's options)", "", "verbs:"]
    for name, entry in table.items():
        if isinstance(entry, dict):
            subs = ", ".join(entry)
            lines.append(f"  {name:<{width}}{subs}")
            for sub, (summary, _t) in entry.items():
                lines.append(f"  {'':<{width}}  {sub:<10} {summary}")
        else:
            lines.append(f"  {name:<{width}}{entry[0]}")
    return "\n".join(lines)


# Optional packages a verb may need, and the extra that installs them.
EXTRAS = {"fastapi": "serve", "uvicorn": "serve", "starlette": "serve", "gguf": "export"}


def _run(target: str, argv: list[str]) -> int:
    module_name, func_name = target.split(":")
    from xiaolm.errors import XiaolmError

    try:
        module = importlib.import_module(module_name)
        result = getattr(module, func_name)(argv)
    except XiaolmError as exc:  # an expected error, raised anywhere in the library: one line, no traceback
        print(f"xiaolm: error: {exc}", file=sys.stderr, flush=True)
        return exc.code
    except ModuleNotFoundError as exc:  # an extra that is not installed: say which, in one line
        top = (exc.name or "").split(".")[0]
        if top not in EXTRAS:
            raise
        print(f"xiaolm: error: this verb needs {top}: pip install 'xiaolm[{EXTRAS[top]}]'", file=sys.stderr)
        return 2
    return int(result or 0)


def main(argv: list[str] | None = None) -> int:
    # Busy-waiting OpenMP threads collapse CPU training ~30x as soon as anything else shares the cores (measured:
    # 800 vs 30,000 tokens/s for the tiny preset on a loaded 2-core machine). Must be set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage(VERBS, "xiaolm"))
        return 0
    if argv[0] in ("-V", "--version"):
        from xiaolm import __version__

        print(f"xiaolm {__version__}")
        return 0
    verb, rest = argv[0], argv[1:]
    entry = VERBS.get(verb)
    if entry is None:
        print(f"xiaolm: unknown verb {verb!r}\n\n{_usage(VERBS, 'xiaolm')}", file=sys.stderr)
        return 2
    if isinstance(entry, dict):
        if not rest or rest[0] in ("-h", "--help"):
            print(_usage(entry, f"xiaolm {verb}"))
            return 0
        sub = entry.get(rest[0])
        if sub is None:
            print(f"xiaolm {verb}: unknown verb {rest[0]!r}\n\n{_usage(entry, f'xiaolm {verb}')}", file=sys.stderr)
            return 2
        return _run(sub[1], rest[1:])
    return _run(entry[1], rest)


if __name__ == "__main__":
    sys.exit(main())
