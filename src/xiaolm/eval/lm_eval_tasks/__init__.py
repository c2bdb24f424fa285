"""lm-evaluation-harness task definitions for local C-Eval / CMMLU style CSVs (no Hub download).

``write_tasks(data, out_dir)`` writes one YAML task per subject plus a group ``xiaolm_mc`` whose ``dataset_path:
csv`` points at the local files, with exactly the prompt and scoring of ``xiaolm eval mc`` (description, ``题目：``
questions, lettered options, ``答案：``, choices ``A``-``D`` with no delimiter, ``<|endoftext|>`` in front), so both
scorers see the same tokens and agree question by question. The lm-eval command line then is::

    xiaolm export hf RUNDIR HFDIR
    xiaolm eval mc HFDIR --data CSVDIR --backend lm-eval            # writes the tasks, runs lm-eval, prints
    # or by hand, with the YAMLs that command leaves in --tasks-dir:
    lm_eval --model hf --model_args pretrained=HFDIR,dtype=float32 --include_path TASKDIR --tasks xiaolm_mc

``run_lm_eval`` is what ``xiaolm eval mc --backend lm-eval`` calls; a RUNDIR is exported to a temporary Hugging
Face directory first. ``template.yaml`` beside this file shows the per-subject task for reading.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import yaml

from xiaolm.utils import fail

GROUP = "xiaolm_mc"
TEMPLATE_FILE = Path(__file__).with_name("template.yaml")
UTILS_FILE = Path(__file__).with_name("xiaolm_mc_utils.py")
# lm-eval's YAML tag for a Python hook; written as text because yaml.safe_dump cannot emit it.
PROCESS_DOCS = "process_docs: !function xiaolm_mc_utils.process_docs\n"


def _task_name(subject: str) -> str:
    return f"{GROUP}_{re.sub(r'[^0-9A-Za-z_]+', '_', subject)}"


def write_tasks(data: str | Path, out_dir: str | Path, split: str = "test",
                subjects: Optional[list[str]] = None) -> list[str]:
    """Write the task YAMLs for the CSVs under ``data`` into ``out_dir``; returns the per-subject task names."""
    from xiaolm.eval.mc_data import _csvs, subject_of

    data = Path(data).resolve()
    if (data / split).is_dir():
        files, dev_dir = _csvs(data / split), data / "dev"
    elif data.is_dir():
        files, dev_dir = _csvs(data), None
    else:
        files, dev_dir = [data], None
    if subjects:
        files = [f for f in files if subject_of(f) in set(subjects)]
    if not files:
        raise fail(f"--data {data}: no .csv files found (split {split!r})")
    text = TEMPLATE_FILE.read_text(encoding="utf-8")
    template = yaml.safe_load("\n".join(l for l in text.splitlines() if not l.startswith("process_docs:")))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for f in files:
        subject = subject_of(f)
        task = dict(template)
        task["task"] = _task_name(subject)
        data_files = {"test": str(f)}
        dev = dev_dir / f.name if dev_dir is not None else None
        if dev is not None and dev.is_file():
            data_files["dev"] = str(dev)
            task["fewshot_split"] = "dev"
        else:
            task.pop("fewshot_split", None)
            task.pop("fewshot_config", None)
        task["dataset_kwargs"] = {**template.get("dataset_kwargs", {}), "data_files": data_files}
        (out / f"{task['task']}.yaml").write_text(
            yaml.safe_dump(task, allow_unicode=True, sort_keys=False) + PROCESS_DOCS, encoding="utf-8")
        names.append(task["task"])
    group = {"group": GROUP, "task": names,
             "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
             "metadata": {"version": 1.0}}
    shutil.copyfile(UTILS_FILE, out / UTILS_FILE.name)
    (out / f"_{GROUP}.yaml").write_text(yaml.safe_dump(group, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return names


def run_lm_eval(run: str | Path, data: str | Path, split: str = "test", shots: int = 0,
                subjects: Optional[list[str]] = None, limit: Optional[int] = None, batch_size: int = 16,
                device: str = "cpu", tasks_dir: Optional[str | Path] = None) -> dict:
    """Evaluate through lm-evaluation-harness's ``hf`` model on the Hugging Face export of ``run``; returns a
    result in ``xiaolm eval mc``'s shape (accuracy, per-subject, chance)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise fail("--backend lm-eval needs lm-evaluation-harness: pip install lm-eval") from None
    run = Path(run)
    with tempfile.TemporaryDirectory(prefix="xiaolm-lm-eval-") as tmp:
        hf_dir = run
        if not ((run / "config.json").is_file() and (run / "tokenizer.json").is_file()):
            from xiaolm.export.hf import export_hf

            hf_dir = export_hf(run, Path(tmp) / "hf", dtype="float32")
        task_dir = Path(tasks_dir) if tasks_dir else Path(tmp) / "tasks"
        names = write_tasks(data, task_dir, split, subjects)
        results = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": str(hf_dir), "dtype": "float32", "device": device},
            tasks=[GROUP], num_fewshot=shots, batch_size=batch_size, limit=limit, log_samples=False,
            task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        )
    per = {}
    for name in names:
        r = results["results"][name]
        n = results["n-samples"][name]["effective"]
        acc = float(r["acc,none"])
        per[name[len(GROUP) + 1:]] = {"accuracy": acc, "correct": round(acc * n), "total": n}
    total = sum(s["total"] for s in per.values())
    correct = sum(s["correct"] for s in per.values())
    return {
        "model": str(run), "data": str(data), "split": split, "backend": f"lm-eval {lm_eval.__version__}",
        "accuracy": correct / total, "accuracy_stderr": (correct / total * (1 - correct / total) / total) ** 0.5,
        "chance": 0.25, "macro_accuracy": sum(s["accuracy"] for s in per.values()) / len(per),
        "correct": correct, "questions": total, "subjects": per, "shots": shots,
        "letter_mass": float("nan"), "predicted_letters": {}, "gold_letters": {},
        "scoring": "lm-evaluation-harness multiple_choice 'acc' on the same prompt (task YAMLs: "
                   "xiaolm/eval/lm_eval_tasks)",
        "lm_eval_results": json.loads(json.dumps(results["results"], default=str)),
    }
