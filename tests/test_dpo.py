"""``xiaolm dpo``: reference log-probabilities computed once (so the DPO loss is exactly ln 2 at step 0, full and
LoRA), every variant trains through the shared Trainer and logs its margins and accuracy, the policy learns the
preferences it is shown, iterated on-policy rounds, exact resume, and outputs that ``load_model`` and
``xiaolm eval instruct`` read."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from xiaolm.cli import main
from xiaolm.utils import read_jsonl, write_jsonl

FAST = ["--no-progress", "--no-tensorboard", "--device", "cpu", "--micro-batch-size", "4", "--log-every", "1"]


@pytest.fixture(scope="module")
def instruct_dir(tmp_path_factory, stories_file):
    out = tmp_path_factory.mktemp("dpo_instruct")
    assert main(["data", "instruct", str(stories_file), "--out", str(out), "--limit", "300",
                 "--heldout-fraction", "0.2"]) == 0
    return out


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory, instruct_dir):
    """Easy pairs: the first sentences of the reference story (chosen) against a loop (rejected)."""
    out = tmp_path_factory.mktemp("dpo_pairs") / "pairs.jsonl"
    recs = []
    for i, r in enumerate(read_jsonl(instruct_dir / "train.jsonl")):
        if i >= 40:
            break
        story = r["messages"][-1]["content"]
        recs.append({"prompt": r["messages"][:-1], "chosen": story[:40], "rejected": "小猫小猫小猫" * 5,
                     "constraints": r["constraints"]})
    write_jsonl(out, recs)
    return out


def _metrics(run: Path, kind: str = "train") -> list[dict]:
    return [r for r in read_jsonl(run / "metrics.jsonl") if r.get("kind") == kind]


def test_reference_once_and_loss_is_ln2_at_step_zero(tiny_run, pairs_file):
    from xiaolm.align.dpo import LossSettings, PreferenceBatches, attach_reference, encode_pairs, preference_loss
    from xiaolm.data.pairs import load_preferences
    from xiaolm.model.io import load_model
    from xiaolm.train.dist import DistEnv

    model, tok, _ = load_model(tiny_run)
    pairs = load_preferences([str(pairs_file)])[0]
    data = encode_pairs(tok, pairs, seq_len=model.config.max_position_embeddings)
    attach_reference(model, data, tok.pad_id, batch_size=7)  # batches of other shapes than training's
    batches = PreferenceBatches(data, micro_batch=5, accum=1, env=DistEnv(), seed=0, pad_id=tok.pad_id)
    batch = batches(0, 0)
    batch.pop("num_tokens")
    for loss_name in ("dpo", "kto"):
        if loss_name == "kto":
            from xiaolm.align.dpo import encode_labelled

            data = encode_labelled(tok, pairs, [], model.config.max_position_embeddings, seed=0)
            attach_reference(model, data, tok.pad_id, batch_size=7)
            batch = PreferenceBatches(data, 5, 1, DistEnv(), 0, tok.pad_id)(0, 0)
            batch.pop("num_tokens")
        loss, metrics = preference_loss(model, batch, LossSettings(loss_name, beta=0.1))
        if loss_name == "dpo":
            assert loss.item() == pytest.approx(math.log(2), abs=1e-4)
            assert abs(metrics["reward_margin"].item()) < 1e-4
        else:  # KTO at step 0: rewards 0 and KL 0, so every example costs 1 - σ(0) = 0.5
            assert loss.item() == pytest.approx(0.5, abs=1e-4) and metrics["kl"].item() == pytest.approx(0, abs=1e-4)
    # batches are a pure function of (step, micro)
    b1, b2 = batches(3, 0), batches(3, 0)
    assert torch.equal(b1["input_ids"], b2["input_ids"]) and torch.equal(b1["ref_chosen"], b2["ref_chosen"])


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dpo_learns_the_preferences_and_logs_margins(tmp_path, tiny_run, pairs_file, instruct_dir, lora):
    out = tmp_path / "dpo"
    extra = ["--lora", "--lora-r", "4", "--lr", "3e-3"] if lora else ["--lr", "1e-3"]
    assert main(["dpo", str(tiny_run), "--data", str(pairs_file), "--loss", "dpo", "--out", str(out),
                 "--max-steps", "25", "--heldout-fraction", "0.2", "--beta", "0.5", *FAST, *extra]) == 0
    train = _metrics(out)
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # the first step's loss: policy == reference
    for key in ("rewards_chosen", "rewards_rejected", "reward_margin", "pref_accuracy", "logps_chosen",
                "logps_rejected"):
        assert key in train[-1]
    assert train[-1]["reward_margin"] > 0.5 and train[-1]["pref_accuracy"] == 1.0
    assert train[-1]["loss"] < 0.3
    ev = _metrics(out, "eval")[-1]
    assert ev["val_accuracy"] == 1.0 and ev["val_loss"] < math.log(2)
    from xiaolm.model.io import load_model

    model, _, info = load_model(out)
    assert info.kind == ("lora" if lora else "xiaolm")
    if lora:
        assert (info.path / "adapter" / "adapter_config.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"][0]["train_examples"] > 20 and (out / "report.md").is_file()
    assert (out / "config.yaml").is_file()


@pytest.mark.parametrize("loss", ["ipo", "simpo", "orpo", "kto"])
def test_variants_train_and_their_output_is_a_policy(tmp_path, tiny_run, pairs_file, instruct_dir, loss):
    out = tmp_path / loss
    assert main(["dpo", str(tiny_run), "--data", str(pairs_file), "--loss", loss, "--out", str(out),
                 "--max-steps", "12", "--lr", "1e-3", "--heldout-fraction", "0.2", *FAST]) == 0
    train = _metrics(out)
    assert all(math.isfinite(r["loss"]) for r in train)
    if loss == "kto":
        assert train[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # z0 at step 0: policy == reference
        assert train[-1]["rewards_desirable"] > train[-1]["rewards_undesirable"]
    else:
        assert train[-1]["pref_accuracy"] > 0.5 and train[-1]["loss"] < train[0]["loss"]
    # the output is a policy RUNDIR the instruction eval reads
    result = tmp_path / "eval.json"
    assert main(["eval", "instruct", str(out), "--data", str(instruct_dir / "heldout.jsonl"), "--limit", "4",
                 "--sampling.max_new_tokens", "16", "--out", str(result)]) == 0
    assert json.loads(result.read_text())["samples"] == 4


def test_kto_reads_labelled_data(tmp_path, tiny_run):
    labelled = tmp_path / "labelled.jsonl"
    write_jsonl(labelled, [{"prompt": "讲一个故事。", "completion": "从前有一只小猫。", "label": True},
                           {"prompt": "讲一个故事。", "completion": "猫猫猫猫猫猫", "label": False},
                           {"prompt": [{"role": "user", "content": "讲小狗。"}], "completion": "小狗在跑。",
                            "label": True}])
    out = tmp_path / "kto"
    assert main(["dpo", str(tiny_run), "--data", str(labelled), "--loss", "kto", "--out", str(out),
                 "--max-steps", "2", *FAST]) == 0
    assert json.loads((out / "summary.json").read_text())["rounds"][0]["train_examples"] == 3
    # labelled data alone means nothing to the paired losses
    assert main(["dpo", str(tiny_run), "--data", str(labelled), "--loss", "dpo", "--out", str(tmp_path / "d"),
                 "--max-steps", "2", *FAST]) == 2


def test_resume_is_exact(tmp_path, tiny_run, pairs_file):
    from safetensors.torch import load_file

    args = ["dpo", str(tiny_run), "--data", str(pairs_file), "--max-steps", "6", "--lr", "1e-3", "--eval-every",
            "0", "--save-every", "3", *FAST]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert main([*args, "--out", str(tmp_path / "parts"), "--stop-at-step", "3"]) == 0
    assert main([*args, "--out", str(tmp_path / "parts"), "--resume"]) == 0
    a = load_file(str(tmp_path / "whole" / "checkpoints" / "step-00000006" / "model.safetensors"))
    b = load_file(str(tmp_path / "parts" / "checkpoints" / "step-00000006" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_iterative_rounds_sample_new_pairs(tmp_path, tiny_run, instruct_dir):
    out = tmp_path / "iter"
    assert main(["dpo", str(tiny_run), "--prompts", str(instruct_dir), "--rounds", "2", "--out", str(out),
                 "--max-steps", "3", "--pairs.k", "3", "--pairs.limit", "10", "--pairs.min-margin", "0",
                 "--pairs.sampling.max-new-tokens", "16", "--heldout-fraction", "0", *FAST]) == 0
    for r in (1, 2):
        pairs = list(read_jsonl(out / "rounds" / f"pairs-round-{r}.jsonl"))
        assert pairs and all(p["round"] == r for p in pairs)
        assert (out / "rounds" / f"pairs-round-{r}.jsonl.report.json").is_file()
    held = {r["story_id"] for r in read_jsonl(instruct_dir / "heldout.jsonl")}
    assert not held & {p["story_id"] for p in read_jsonl(out / "rounds" / "pairs-round-2.jsonl")}
    assert (out / "rounds" / "round-1" / "checkpoints" / "latest").is_file()
    s = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in s["rounds"]] == [1, 2]
    # round 2's reference is the round-1 policy, so its DPO loss starts at ln 2 again
    assert _metrics(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    from xiaolm.model.io import load_model

    load_model(out)
    # a finished round is not rerun: the same command resumes straight into round 2's result
    assert main(["dpo", str(tiny_run), "--prompts", str(instruct_dir), "--rounds", "2", "--out", str(out),
                 "--max-steps", "3", "--pairs.k", "3", "--pairs.limit", "10", "--pairs.min-margin", "0",
                 "--pairs.sampling.max-new-tokens", "16", "--heldout-fraction", "0", "--resume", *FAST]) == 0


def test_bad_invocations_fail_clearly(tmp_path, tiny_run, pairs_file, capsys):
    assert main(["dpo", str(tiny_run), "--out", str(tmp_path / "x")]) == 2  # no data, no prompts
    assert "give preference pairs" in capsys.readouterr().err
    assert main(["dpo", str(tiny_run), "--data", str(pairs_file), "--rounds", "2", "--out", str(tmp_path / "x")]) == 2
    assert "--prompts" in capsys.readouterr().err
    assert main(["dpo", str(tmp_path / "nope"), "--data", str(pairs_file), "--out", str(tmp_path / "x")]) == 2


def test_reference_in_the_trainers_precision_gives_ln2_at_step_zero_under_bf16(tmp_path, tiny_run, pairs_file):
    # the policy trains under bf16 autocast: a float32 reference would put the step-0 margins off 0 (issue 23)
    out = tmp_path / "bf16"
    assert main(["dpo", str(tiny_run), "--data", str(pairs_file), "--out", str(out), *FAST, "--max-steps", "1",
                 "--precision", "bf16", "--eval-every", "0", "--beta", "0.1"]) == 0
    first = _metrics(out)[0]
    assert first["reward_margin"] == 0.0 and first["rewards_chosen"] == 0.0 and first["rewards_rejected"] == 0.0
    assert first["loss"] == round(math.log(2), 6)
