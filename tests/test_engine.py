"""The training engine on its own: one step (Trainer.train_step), the token-weighted loss across micro-batches and
ranks, the checkpoint hooks, and which verbs offer --global-batch-tokens."""
from __future__ import annotations

import os
import socket

import pytest
import torch

from xiaolm.cli import main
from xiaolm.model.llama import Llama, preset_config
from xiaolm.train.dist import DistEnv
from xiaolm.train.engine import TrainConfig, Trainer
from xiaolm.train.sft import sft_loss

VOCAB, WIDTH = 300, 24


def _model(seed: int = 0, layers: int = 2) -> Llama:
    torch.manual_seed(seed)
    return Llama(preset_config("tiny", vocab_size=VOCAB, max_position_embeddings=64, num_hidden_layers=layers))


def _cfg(**kw) -> TrainConfig:
    base = dict(max_steps=2, lr=1e-3, warmup_steps=0, grad_clip=0.0, precision="fp32", device="cpu", prefetch=0,
                progress=False, tensorboard=False, log_every=1, eval_every=0, keep_last=1)
    return TrainConfig(**{**base, **kw})


def _sft_batch(rows: int, labelled: int, seed: int) -> dict:
    """``rows`` sequences whose last ``labelled`` positions carry labels (the rest masked like a prompt)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, VOCAB, (rows, WIDTH + 1), generator=g)
    targets = x[:, 1:].clone()
    targets[:, : WIDTH - labelled] = -100
    return {"input_ids": x[:, :-1], "targets": targets}


def _step_grads(trainer: Trainer, batches: list[dict]):
    """Run one train_step and keep the gradients the optimizer would have applied."""
    seen = {}

    def record(*a, **k):
        seen["grads"] = [p.grad.detach().clone() for p in trainer.params]

    trainer.optimizer.step = record
    out = trainer.train_step(batches, sft_loss, step=0)
    return out, seen["grads"]


def _cat(a: dict, b: dict) -> dict:
    return {k: torch.cat([a[k], b[k]]) for k in a}


def test_micro_batches_weigh_by_their_label_tokens(tmp_path):
    # Two micro-batches with 20 and 2 label tokens per row: accumulated, they must give the gradient of the one batch
    # that holds both (every assistant token weighs the same), not the mean of the two micro-batch means.
    full, sparse = _sft_batch(2, 20, seed=1), _sft_batch(2, 2, seed=2)
    env = DistEnv()
    split = Trainer(_cfg(grad_accum_steps=2), _model(), tmp_path / "a", total_steps=2, dist_env=env)
    joined = Trainer(_cfg(), _model(), tmp_path / "b", total_steps=2, dist_env=env)
    out_split, g_split = _step_grads(split, [full, sparse])
    out_joined, g_joined = _step_grads(joined, [_cat(full, sparse)])
    torch.testing.assert_close(out_split.loss, out_joined.loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_split, g_joined):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    # and the mean of the two means, which the engine used to take, is measurably different
    with torch.no_grad():
        means = [float(sft_loss(joined.model, b)[0] / sft_loss(joined.model, b)[1]) for b in (full, sparse)]
    assert abs(sum(means) / 2 - float(out_joined.loss)) > 1e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_step(rank: int, port: int, batches: list[dict], out_dir: str, compile: bool = False) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    if compile:  # compile in this process: a pool of compile workers per rank costs more than it saves here
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        env = DistEnv(rank=rank, world_size=2, local_rank=rank, device="cpu")
        trainer = Trainer(_cfg(compile=compile), _model(layers=1 if compile else 2), os.path.join(out_dir, f"r{rank}"),
                          total_steps=2, dist_env=env)
        out, grads = _step_grads(trainer, [batches[rank]])
        dist.all_reduce(out.loss)  # the ranks' shares add up to the step's loss
        if rank == 0:
            wrappers = [type(trainer.model).__name__, type(getattr(trainer.model, "_orig_mod", None)).__name__]
            torch.save({"loss": out.loss, "grads": grads, "wrappers": wrappers}, os.path.join(out_dir, "ddp.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_ranks_weigh_by_their_label_tokens(tmp_path, compile):
    # The same rule across DDP ranks: rank 0 holds 20 label tokens a row, rank 1 holds 2. Compiled, the DDP module
    # is what is compiled (dynamo splits the graph at DDP's buckets so all-reduce overlaps backward), and the
    # gradients are the one-process gradients all the same (inductor runs on the CPU).
    import torch.multiprocessing as mp

    full, sparse = _sft_batch(2, 20, seed=1), _sft_batch(2, 2, seed=2)
    # fork: the ranks start without importing torch again (a second or two instead of ~20 on a busy machine)
    mp.start_processes(_rank_step, args=(_free_port(), [full, sparse], str(tmp_path), compile), nprocs=2,
                       join=True, start_method="fork")
    ddp = torch.load(tmp_path / "ddp.pt")
    if compile:
        assert ddp["wrappers"] == ["OptimizedModule", "DistributedDataParallel"]
    # (compiled: one layer, half the compile time of two on a busy 2-core machine)
    joined = Trainer(_cfg(), _model(layers=1 if compile else 2), tmp_path / "b", total_steps=2, dist_env=DistEnv())
    out, grads = _step_grads(joined, [_cat(full, sparse)])
    torch.testing.assert_close(ddp["loss"], out.loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(ddp["grads"], grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


class _HookedTrainer(Trainer):
    restored: list = []

    def checkpoint_files(self) -> dict[str, bytes]:
        return {"extra/note.txt": b"written with the checkpoint"}

    def extra_state(self) -> dict:
        return {"calls": 7}

    def load_extra_state(self, state: dict) -> None:
        _HookedTrainer.restored.append(state)


def test_checkpoint_hooks_write_files_and_restore_state(tmp_path):
    from xiaolm.model.io import find_checkpoint, verify_checkpoint

    batch = _sft_batch(2, 10, seed=3)
    run = tmp_path / "run"
    t = _HookedTrainer(_cfg(stop_at_step=1), _model(), run, total_steps=2, dist_env=DistEnv())
    assert t.fit(lambda step, micro: batch, sft_loss).interrupted
    ckpt = find_checkpoint(run)
    verify_checkpoint(ckpt)  # the extra file is covered by the checkpoint's sha256 list
    assert (ckpt / "extra" / "note.txt").read_bytes() == b"written with the checkpoint"
    t = _HookedTrainer(_cfg(resume=True), _model(), run, total_steps=2, dist_env=DistEnv())
    assert t.fit(lambda step, micro: batch, sft_loss).step == 2
    assert _HookedTrainer.restored == [{"calls": 7}]


@pytest.mark.parametrize("verb", ["sft", "reward", "dpo", "grpo"])
def test_global_batch_tokens_is_only_offered_by_pretraining(verb, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([verb, str(tmp_path), "--global-batch-tokens", "4096"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --global-batch-tokens" in capsys.readouterr().err


def test_pretraining_honours_global_batch_tokens(shards_dir, tmp_path):
    import json

    import yaml
    from conftest import TINY_PRETRAIN

    out = tmp_path / "gbt"
    # TINY_PRETRAIN: 8 sequences x 128 tokens per micro-batch; 4096 tokens a step take 4 of them
    assert main(["pretrain", "--data", str(shards_dir), "--out", str(out), *TINY_PRETRAIN, "--max-steps", "1",
                 "--log-every", "1", "--eval-every", "0", "--sample-tokens", "0", "--global-batch-tokens", "4096"]) == 0
    rec = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][0]
    assert rec["tokens"] == 4096
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["grad_accum_steps"] == 4


def test_grpo_derives_its_options_once_and_refuses_conflicts():
    from xiaolm.align.grpo import GRPOConfig, resolve_train
    from xiaolm.errors import XiaolmError

    cfg = GRPOConfig(prompts_per_step=4, group_size=4)
    cfg.train.micro_batch_size = 6
    got = resolve_train(cfg, n_prompts=10)
    assert (got.train.grad_accum_steps, got.train.max_steps) == (3, 3)  # ceil(16 / 6); ceil(10 prompts / 4)
    assert (cfg.train.grad_accum_steps, cfg.train.max_steps) == (0, None)  # the given config is left as it was
    cfg.train.prefetch = 2
    with pytest.raises(XiaolmError, match="--prefetch must stay 0"):
        resolve_train(cfg, 10)
    cfg.train.prefetch, cfg.train.grad_accum_steps = 0, 2
    with pytest.raises(XiaolmError, match="grpo accumulates the 3 micro-batches"):
        resolve_train(cfg, 10)
