"""``xiaolm reward``: the scalar head reads the last real token (padding changes nothing), the Bradley-Terry loss is
ln 2 at step 0, a reward model learns an easy preference and generalises to held-out prompts, ``xiaolm reward score``
scores pairs and single responses, and the real preference files train and evaluate end to end."""
from __future__ import annotations

import json
import math

import pytest
import torch

from xiaolm.cli import main
from xiaolm.utils import read_jsonl, write_jsonl

FAST = ["--no-progress", "--no-tensorboard", "--device", "cpu", "--log-every", "5"]


@pytest.fixture(scope="module")
def easy_pairs(tmp_path_factory, stories_file):
    """Story openings (chosen) against loops (rejected), under many different prompts."""
    out = tmp_path_factory.mktemp("rm_pairs") / "pairs.jsonl"
    recs = []
    for i, r in enumerate(read_jsonl(stories_file)):
        if i >= 160:
            break
        story = r["story_zh"]
        word = story[2:4]
        recs.append({"prompt": f"写一个故事，第{i}个。", "chosen": story[:30], "rejected": (word + "，") * 8})
    write_jsonl(out, recs)
    return out


def test_head_reads_the_last_real_token(tiny_run):
    from xiaolm.align.reward import collate_scored
    from xiaolm.model.reward import RewardModel
    from xiaolm.model.io import load_model

    policy, tok, _ = load_model(tiny_run)
    rm = RewardModel.from_policy(policy).eval()
    rows = [tok.encode("从前有一只小猫。"), tok.encode("小狗在草地上跑来跑去，很开心。")]
    b = collate_scored(rows, tok.pad_id)
    with torch.no_grad():
        assert torch.equal(rm(b["input_ids"], b["lengths"]), torch.zeros(2))  # the head starts at zero
        torch.nn.init.normal_(rm.score.weight, std=0.5)
        batched = rm(b["input_ids"], b["lengths"])
        alone = torch.stack([rm(torch.tensor([r]), torch.tensor([len(r)]))[0] for r in rows])
        assert torch.allclose(batched, alone, atol=1e-5)
        noisy = b["input_ids"].clone()
        noisy[0, len(rows[0]):] = 5  # change only padding
        assert torch.allclose(rm(noisy, b["lengths"]), batched, atol=1e-5)
        changed = b["input_ids"].clone()
        changed[0, len(rows[0]) - 1] = 7  # the last real token matters
        assert not torch.allclose(rm(changed, b["lengths"])[0], batched[0])


def test_reward_model_learns_and_scores(tmp_path, tiny_run, easy_pairs, capsys):
    out = tmp_path / "rm"
    assert main(["reward", str(tiny_run), "--data", str(easy_pairs), "--out", str(out), "--max-steps", "40",
                 "--lr", "3e-3", "--micro-batch-size", "16", "--heldout-fraction", "0.2", "--eval-every", "20",
                 *FAST, "--log-every", "1"]) == 0
    printed = capsys.readouterr().out
    assert "held-out" in printed
    train = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    # the head starts at zero, so the first step's loss (before any update) is ln 2 exactly; a whole logging
    # interval is not: a well-pretrained base learns these easy pairs within a few steps
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert "accuracy" in train[-1] and "margin" in train[-1]
    s = json.loads((out / "summary.json").read_text())
    assert s["heldout_pairs"] > 15 and s["train_pairs"] + s["heldout_pairs"] == 160
    assert s["heldout_accuracy"] >= 0.9 and s["train_accuracy"] >= 0.9
    assert "Pairwise accuracy" in (out / "report.md").read_text() and (out / "config.yaml").is_file()

    # score pairs (accuracy) and single responses, with malformed records reported
    scored = tmp_path / "scores.jsonl"
    assert main(["reward", "score", str(out), "--data", str(easy_pairs), "--out", str(scored)]) == 0
    assert "pairwise accuracy" in capsys.readouterr().out
    recs = list(read_jsonl(scored))
    assert len(recs) == 160 and all("score_chosen" in r and "score_rejected" in r for r in recs)
    assert sum(r["score_chosen"] > r["score_rejected"] for r in recs) >= 0.9 * 160
    singles = tmp_path / "singles.jsonl"
    singles.write_text("\n".join([
        json.dumps({"prompt": "写一个故事。", "response": "从前有一只小猫，它很喜欢晒太阳。"}, ensure_ascii=False),
        json.dumps({"messages": [{"role": "user", "content": "写一个故事。"},
                                 {"role": "assistant", "content": "猫，猫，猫，猫，猫，猫，"}]}, ensure_ascii=False),
        json.dumps({"prompt": "写一个故事。"}, ensure_ascii=False),
    ]) + "\n", encoding="utf-8")
    assert main(["reward", "score", str(out), "--data", str(singles), "--out", str(tmp_path / "s.jsonl")]) == 0
    captured = capsys.readouterr()
    assert "1 malformed skipped" in captured.out and f"{singles}:3" in captured.err
    story, loop = list(read_jsonl(tmp_path / "s.jsonl"))
    assert story["score"] > loop["score"]


def test_score_refuses_a_policy_and_missing_files(tmp_path, tiny_run, easy_pairs, capsys):
    assert main(["reward", "score", str(tiny_run), "--data", str(easy_pairs)]) == 2
    assert "not a reward model" in capsys.readouterr().err
    assert main(["reward", "score", str(tiny_run), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert main(["reward", str(tiny_run), "--out", str(tmp_path / "x")]) == 2  # no --data


def test_real_preference_files_train_and_evaluate(tmp_path, tiny_run, shared_data):
    """LLaMA-Factory's and MedicalGPT's pairs: hash split by prompt, held-out accuracy reported. (A tiny story model
    knows nothing of code or medicine; the full numbers are in the alignment report, not asserted here.)"""
    out = tmp_path / "rm_real"
    assert main(["reward", str(tiny_run), "--data", str(shared_data / "llamafactory_demo_zh" / "dpo_zh_demo.json"),
                 str(shared_data / "medicalgpt" / "reward_medical_test.json"), "--out", str(out),
                 "--max-steps", "6", "--heldout-fraction", "0.25", *FAST]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["train_pairs"] + s["heldout_pairs"] == 400 and s["heldout_pairs"] > 60
    assert 0.0 <= s["heldout_accuracy"] <= 1.0 and s["truncated_pairs"] > 0  # long code answers keep their end


def _change_tokenizer(tok_dir, keep_record: bool) -> None:
    """Swap two tokens' ids in ``tok_dir``: another tokenizer put in its place (its own xiaolm_tokenizer.json
    removed), or, with ``keep_record``, tokenizer.json edited under the fingerprint xiaolm_tokenizer.json records."""
    data = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (tok_dir / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    if not keep_record:
        (tok_dir / "xiaolm_tokenizer.json").unlink()


@pytest.mark.parametrize("change", ["replaced", "edited"])
def test_a_reward_run_whose_tokenizer_changed_is_refused_like_a_policy_run(tmp_path, tiny_run, capsys, change):
    """A reward run's tokenizer is checked against the fingerprint the run trained with, as a policy run's is: a
    changed tokenizer/ is one line naming the file, not scores computed on the wrong ids (or a traceback)."""
    from xiaolm.model.io import CheckpointError, load_model
    from xiaolm.model.reward import RewardModel
    from xiaolm.train.checkpoint import save_checkpoint

    policy, tok, _ = load_model(tiny_run)
    rm = RewardModel.from_policy(policy)
    rm_dir, lm_dir = tmp_path / "rm", tmp_path / "lm"
    for run, model, kind in ((rm_dir, rm, "reward"), (lm_dir, policy, "pretrain")):
        save_checkpoint(run, 1, model, model.config.to_dict(), {"kind": kind, "tokenizer_fingerprint": tok.fingerprint})
        tok.save(run / "tokenizer")
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(pairs, [{"prompt": "写一个故事。", "chosen": "从前有一只小猫。", "rejected": "猫猫猫猫。"}])
    assert main(["reward", "score", str(rm_dir), "--data", str(pairs)]) == 0  # as trained: it scores
    capsys.readouterr()
    with pytest.raises(CheckpointError, match="a reward model, not a language model"):
        load_model(rm_dir)
    errors = []
    for run, argv in ((rm_dir, ["reward", "score", str(rm_dir), "--data", str(pairs)]),
                      (lm_dir, ["generate", str(lm_dir), "--prompt", "从前", "--max-new-tokens", "2"])):
        _change_tokenizer(run / "tokenizer", keep_record=change == "edited")
        assert main(argv) == 2
        errors.append((run, capsys.readouterr().err.strip().splitlines()))
    for run, lines in errors:
        assert len(lines) == 1 and lines[0].startswith("xiaolm: error:"), lines
        assert str(run / "tokenizer") in lines[0] and "tokenizer.json" in lines[0], lines
