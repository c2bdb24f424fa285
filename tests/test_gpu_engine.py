"""The engine's GPU path made right on CPU first (issue 23): backend settings, the non-finite guard without a host
sync, the reference model's precision, DDP + compile, the owned Muon, the device defaults, and the out-of-memory
fallback. ``gpu``-marked tests repeat a check where only CUDA can show it (skipped without CUDA by conftest.py)."""
from __future__ import annotations

import pytest
import torch

from xiaolm.train import dist as dist_mod


# ------------------------------------------------------------------------------------ item 8: TF32 on CUDA


@pytest.fixture
def matmul_precision():
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


def test_setup_turns_on_tf32_matmuls_for_cuda_only(monkeypatch, matmul_precision):
    torch.set_float32_matmul_precision("highest")
    monkeypatch.setattr(dist_mod, "pick_device", lambda pref: "cpu")
    assert dist_mod.setup_distributed("cpu").device == "cpu"
    assert torch.get_float32_matmul_precision() == "highest"  # the CPU keeps exact float32
    assert not torch.backends.cuda.matmul.allow_tf32
    monkeypatch.setattr(dist_mod, "pick_device", lambda pref: "cuda")
    assert dist_mod.setup_distributed("auto").device == "cuda"
    assert torch.get_float32_matmul_precision() == "high"
    assert torch.backends.cuda.matmul.allow_tf32


# ------------------------------------------------------------- item 3: skip a non-finite step without a host sync

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402  (the test's spy; not used by xiaolm)

from xiaolm.model.llama import Llama, preset_config  # noqa: E402
from xiaolm.train.dist import DistEnv  # noqa: E402
from xiaolm.train.engine import TrainConfig, Trainer  # noqa: E402
from xiaolm.train.optim import Muon  # noqa: E402
from xiaolm.train.sft import sft_loss  # noqa: E402

VOCAB = 300
# the aten ops that read a device value back to the host: .item(), bool(t), int(t), float(t), nonzero, equal
_HOST_READS = ("_local_scalar_dense", "is_nonzero", "nonzero", "equal", "masked_select", "unique")


class SyncSpy(TorchDispatchMode):
    """Counts the operations that would make the host wait for a CUDA device; on the CPU they run, but they are the
    same calls, so a CPU run shows where a GPU run would stall."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _HOST_READS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def _model(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(preset_config("tiny", vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=False))


def _cfg(**kw) -> TrainConfig:
    base = dict(max_steps=4, lr=1e-3, warmup_steps=0, grad_clip=1.0, precision="fp32", device="cpu", prefetch=0,
                progress=False, tensorboard=False, log_every=1, eval_every=0, keep_last=1, optimizer="muon")
    return TrainConfig(**{**base, **kw})


def _batch(seed: int, rows: int = 2, width: int = 24) -> dict:
    x = torch.randint(1, VOCAB, (rows, width + 1), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": x[:, :-1], "targets": x[:, 1:].clone()}


def _fit_host_reads(tmp_path, steps: int) -> int:
    """Host reads of a whole run of ``steps`` steps logged once at the end (the muon default recipe's optimizer)."""
    trainer = Trainer(_cfg(max_steps=steps, log_every=steps), _model(), tmp_path / f"run{steps}", total_steps=steps,
                      dist_env=DistEnv())
    spy = SyncSpy()
    with spy:
        trainer.fit(lambda step, micro: _batch(step), sft_loss)
    return len(spy.reads)


def test_steps_between_log_points_read_nothing_back_from_the_device(tmp_path):
    # A host read per step (the guard's bool(bad), a loss .item()) would add one per extra step; the reads at the
    # log/checkpoint point are the same for any number of steps.
    assert _fit_host_reads(tmp_path, 2) == _fit_host_reads(tmp_path, 5)


def _snapshot(trainer: Trainer):
    import copy

    state = trainer.optimizer.state_dict()  # the state; the groups' lr follows the schedule, not the step
    return [p.detach().clone() for p in trainer.params], copy.deepcopy({k: v["state"] for k, v in state.items()})


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def _nan_loss(model, batch):
    loss, n, metrics = sft_loss(model, batch)
    return loss * float("nan"), n, metrics


def test_a_skipped_step_leaves_weights_moments_and_step_counts_exactly_unchanged(tmp_path):
    trainer = Trainer(_cfg(), _model(), tmp_path / "a", total_steps=4, dist_env=DistEnv())
    assert trainer.skips_on_device  # the default recipe's optimizer decides on the device
    trainer.train_step([_batch(0)], sft_loss, step=0)
    before = _snapshot(trainer)
    out = trainer.train_step([_batch(1)], _nan_loss, step=1)
    assert bool(out.bad)
    _assert_same(_snapshot(trainer), before)  # Muon's momentum, AdamW's moments and step counts included
    assert before[1]["adamw"][0]["step"] == 1
    # and the run goes on exactly as one that never met the bad step
    trainer.train_step([_batch(2)], sft_loss, step=1)
    clean = Trainer(_cfg(), _model(), tmp_path / "b", total_steps=4, dist_env=DistEnv())
    clean.train_step([_batch(0)], sft_loss, step=0)
    clean.train_step([_batch(2)], sft_loss, step=1)
    _assert_same(_snapshot(trainer), _snapshot(clean))


def test_muon_found_inf_skips_on_the_device_and_zero_changes_nothing():
    torch.manual_seed(0)
    start = [torch.randn(32, 16) * 0.1, torch.randn(16, 32) * 0.1, torch.randn(32, 16) * 0.1]
    runs = []
    for flag in (None, 0.0, 1.0):
        params = [torch.nn.Parameter(s.clone()) for s in start]
        opt = Muon(params, lr=0.02, weight_decay=0.01, adjust_lr_fn="original")
        for step in range(3):
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * step + i))
            if step == 2 and flag is not None:
                opt.found_inf = torch.tensor(flag)
                for p in params:
                    p.grad[0, 0] = float("nan") if flag else p.grad[0, 0]
            before = ([p.detach().clone() for p in params],
                      [opt.state[p]["momentum_buffer"].clone() for p in params if p in opt.state])
            opt.step()
        after = ([p.detach().clone() for p in params], [opt.state[p]["momentum_buffer"].clone() for p in params])
        runs.append((before, after))
    _assert_same(runs[1][1], runs[0][1])  # found_inf 0: bit for bit the plain step
    _assert_same(runs[2][1], runs[2][0])  # found_inf 1: weights and momentum exactly as before the step
    assert all(torch.isfinite(p).all() for p in runs[2][1][0])


@pytest.mark.gpu
def test_cuda_train_steps_between_log_points_never_sync(tmp_path):
    trainer = Trainer(_cfg(device="cuda", precision="bf16"), _model(), tmp_path / "g", total_steps=4,
                      dist_env=DistEnv(device="cuda"))
    batches = [{k: v.cuda() for k, v in _batch(s).items()} for s in range(4)]
    trainer.train_step([batches[0]], sft_loss, step=0)  # warm up (lazy state, cuBLAS handles)
    torch.cuda.synchronize()
    nonfinite = torch.zeros((), device="cuda")
    interval = torch.zeros((), device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for s in (1, 2, 3):
            out = trainer.train_step([batches[s]], _nan_loss if s == 2 else sft_loss, step=s)
            nonfinite += out.bad.float()
            interval += torch.where(out.bad, torch.zeros_like(out.loss), out.loss)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert int(nonfinite.item()) == 1 and torch.isfinite(interval)
    assert all(torch.isfinite(p).all() for p in trainer.params)


# ------------------------------------------------------------------ item 9: our own Muon, and the true torch floor

import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from xiaolm.train.optim import newton_schulz, newton_schulz_dtype  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _former_muon_class():
    """xiaolm's Muon as it was before it was owned (a torch.optim.Muon subclass calling torch's private
    ``_init_group``/``_adjust_lr``), verbatim: the reference the owned one must equal bit for bit."""
    muon_mod = pytest.importorskip("torch.optim._muon")  # torch >= 2.9
    _adjust_lr = muon_mod._adjust_lr

    class FormerMuon(torch.optim.Muon):
        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                params, grads, bufs = [], [], []
                self._init_group(group, params, grads, bufs)
                momentum, lr = group["momentum"], float(group["lr"])
                by_shape: dict[tuple, list[int]] = {}
                for i, (grad, buf) in enumerate(zip(grads, bufs)):
                    buf.lerp_(grad, 1 - momentum)
                    by_shape.setdefault((tuple(grad.shape), grad.device, grad.dtype), []).append(i)
                for (shape, device, _), idx in by_shape.items():
                    stacked = torch.stack([grads[i].lerp(bufs[i], momentum) if group["nesterov"] else bufs[i]
                                           for i in idx])
                    ortho = newton_schulz(stacked, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                          newton_schulz_dtype(device))
                    adjusted = _adjust_lr(lr, group["adjust_lr_fn"], shape)
                    for k, i in enumerate(idx):
                        params[i].mul_(1 - lr * group["weight_decay"])
                        params[i].add_(ortho[k].to(params[i].dtype), alpha=-adjusted)

    return FormerMuon


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_owned_muon_steps_bit_for_bit_like_the_former_torch_subclass(adjust, nesterov):
    former = _former_muon_class()
    torch.manual_seed(0)
    shapes = [(64, 32), (64, 32), (32, 64), (48, 48)]
    start = [torch.randn(*s) * 0.05 for s in shapes]
    runs = []
    for cls in (Muon, former):
        params = [torch.nn.Parameter(s.clone()) for s in start]
        opt = cls(params, lr=0.02, weight_decay=0.01, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust)
        for step in range(3):
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * step + i))
            opt.step()
        runs.append((params, opt.state_dict()))
    (ours, ours_sd), (theirs, theirs_sd) = runs
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)
    _assert_same(ours_sd, theirs_sd)  # the same state layout and groups: checkpoints load either way


def test_training_verbs_import_and_step_muon_on_a_torch_without_muon():
    # torch 2.6-2.8 have no torch.optim.Muon and no torch.optim._muon: every training verb must still import
    code = (
        "import sys, torch\n"
        "sys.modules['torch.optim._muon'] = None\n"
        "del torch.optim.Muon\n"
        "import xiaolm.cli, xiaolm.train.pretrain, xiaolm.train.sft, xiaolm.align.dpo, xiaolm.align.reward\n"
        "import xiaolm.align.grpo, xiaolm.quickstart\n"
        "from xiaolm.train.optim import Muon\n"
        "p = torch.nn.Parameter(torch.ones(4, 3)); p.grad = torch.randn(4, 3)\n"
        "Muon([p], lr=0.1).step(); assert not torch.equal(p, torch.ones(4, 3)); print('ok')\n"
    )
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert ran.returncode == 0 and ran.stdout.strip() == "ok", ran.stderr[-2000:]


# Private torch APIs xiaolm calls, each in one place (and only inside a function, never at import time): the floor
# declared in pyproject.toml holds as long as every other torch call is public. Add one here only with a fallback.
ALLOWED_PRIVATE = {
    "torch._foreach_mul_": "train/engine.py",  # the one-kernel gradient rescale; stable since torch 1.x
    "torch._dynamo.mark_static_address": "infer/cache.py",  # CUDA-graph decode's static cache
    "torch.ops.aten._convert_weight_to_int4pack_for_cpu": "model/quant.py",  # the int4 CPU kernels
    "torch.ops.aten._weight_int8pack_mm": "model/quant.py",
    "torch.ops.aten._weight_int4pack_mm_for_cpu": "model/quant.py",
}
# The newest public torch APIs xiaolm relies on, and the release that introduced each: the declared floor is the
# newest of them.
NEWEST_PUBLIC = {"get_total_norm": "2.6", "fully_shard": "2.6", "flex_attention": "2.5", "enable_gqa": "2.5"}
_PRIVATE = re.compile(  # a leading underscore, not a dunder such as torch.__version__
    r"\btorch(?:\.\w+)*\._(?!_)\w+(?:\.\w+)*|from torch(?:\.\w+)*\._(?!_)\w+|from torch[\w.]* import _(?!_)\w+")


def test_private_torch_apis_are_few_isolated_and_never_imported_at_module_load():
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / "src" / "xiaolm").rglob("*.py")):
        rel = path.relative_to(REPO / "src" / "xiaolm").as_posix()
        for line in path.read_text(encoding="utf-8").splitlines():
            code = line.split("#")[0]
            for m in _PRIVATE.finditer(code):
                found.setdefault(m.group(0), set()).add(rel)
            assert not (re.match(r"(from|import) torch", code) and "._" in code), f"{rel}: {line.strip()}"
    assert {k: sorted(v) for k, v in found.items()} == {k: [v] for k, v in ALLOWED_PRIVATE.items()}


def test_declared_torch_floor_is_the_newest_public_api_used():
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    floor = re.search(r'"torch>=([\d.]+)"', text).group(1)
    source = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "src" / "xiaolm").rglob("*.py"))
    assert all(name in source for name in NEWEST_PUBLIC)  # the table lists what is really used
    newest = max(NEWEST_PUBLIC.values(), key=lambda v: tuple(map(int, v.split("."))))
    assert floor == newest


# --------------------------------------------------------------- item 10: one source of defaults, by device


def test_a_plain_pretrain_config_resolves_to_the_fast_path_on_cuda_and_the_cpu_choice_on_cpu(monkeypatch):
    from xiaolm.config import parse_config
    from xiaolm.train.pretrain import PretrainConfig

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    plain = parse_config(PretrainConfig, ["--data", "d"], "xiaolm pretrain")[0].train
    cuda = dist_mod.resolve_device_defaults(plain, "cuda:0")
    assert cuda.compile is True and cuda.loss_chunk_size > 0 and cuda.precision == "bf16"
    assert dist_mod.resolve_precision(cuda.precision, "cuda:0") == torch.bfloat16
    cpu = dist_mod.resolve_device_defaults(parse_config(PretrainConfig, ["--data", "d"], "x")[0].train, "cpu")
    assert (cpu.compile, cpu.loss_chunk_size, cpu.precision) == (False, 0, "fp32")
    # an explicit choice is kept on either device
    mine = parse_config(PretrainConfig, ["--data", "d", "--no-compile", "--loss-chunk-size", "0"], "x")[0].train
    assert dist_mod.resolve_device_defaults(mine, "cuda").compile is False
    assert mine.loss_chunk_size == 0 and mine.precision == "bf16"


def test_help_shows_the_device_defaults(capsys):
    from xiaolm.cli import main

    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--compile, --no-compile torch.compile the model (default auto: on CUDA on, on CPU off)" in text
    assert "(default auto: on CUDA 8192, on CPU off)" in text
    assert "auto: on CUDA bf16, on CPU fp32" in text


def test_a_run_records_the_resolved_defaults_in_its_config(tiny_run):
    import yaml

    train = yaml.safe_load((tiny_run / "config.yaml").read_text(encoding="utf-8"))["train"]
    assert (train["compile"], train["loss_chunk_size"], train["precision"]) == (False, 0, "fp32")


# ------------------------------------------------- item 11: out of memory at the first steps, memory in the log

import dataclasses  # noqa: E402
import json  # noqa: E402

from xiaolm.train.memory import GIB, MemoryCreep, memory_stats, split_rows  # noqa: E402


@dataclasses.dataclass
class _Run:  # what a verb passes as full_config: config.yaml is written from it
    train: TrainConfig


def _rows(step: int) -> dict:
    return _batch(100 + step, rows=4)


def _losses(run) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


def test_out_of_memory_at_the_first_step_halves_the_micro_batch_and_keeps_the_loss_curve(tmp_path, capsys):
    import yaml

    calls = {"n": 0}

    def oom_once_at_four_rows(model, batch):
        calls["n"] += 1
        if batch["input_ids"].shape[0] == 4 and calls["n"] == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return sft_loss(model, batch)

    cfg = _cfg(micro_batch_size=4, grad_accum_steps=1, optimizer="adamw", max_steps=4)
    hit = Trainer(cfg, _model(), tmp_path / "hit", total_steps=4, dist_env=DistEnv(), full_config=_Run(cfg),
                  oom_fallback=True)
    hit.fit(lambda step, micro: _rows(step), oom_once_at_four_rows)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "out of memory" in ln]
    assert lines == ["out of memory at step 1: micro-batch halved to 2, accumulation doubled to 2 (same global batch "
                     "and loss curve; recorded in config.yaml)"]
    recorded = yaml.safe_load((tmp_path / "hit" / "config.yaml").read_text())["train"]
    assert (recorded["micro_batch_size"], recorded["grad_accum_steps"]) == (2, 2)
    # a run with the halved micro-batch from the start: the same rows, two at a time
    cfg2 = _cfg(micro_batch_size=2, grad_accum_steps=2, optimizer="adamw", max_steps=4)
    halved = Trainer(cfg2, _model(), tmp_path / "halved", total_steps=4, dist_env=DistEnv())
    halved.fit(lambda step, micro: {k: v[2 * micro: 2 * micro + 2] for k, v in _rows(step).items()}, sft_loss)
    assert _losses(tmp_path / "hit") == _losses(tmp_path / "halved") and len(_losses(tmp_path / "hit")) == 4
    for p, q in zip(hit.params, halved.params):
        assert torch.equal(p, q)


def test_out_of_memory_is_raised_where_halving_cannot_help(tmp_path):
    def always_oom(model, batch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    cfg = _cfg(micro_batch_size=4, optimizer="adamw")
    with pytest.raises(torch.OutOfMemoryError):  # halved down to one row, then raised
        Trainer(cfg, _model(), tmp_path / "a", total_steps=4, dist_env=DistEnv(), oom_fallback=True).fit(
            lambda step, micro: _rows(step), always_oom)
    with pytest.raises(torch.OutOfMemoryError):  # a verb whose units do not add up across rows: never split
        Trainer(_cfg(), _model(), tmp_path / "b", total_steps=4, dist_env=DistEnv()).fit(
            lambda step, micro: _rows(step), always_oom)


def test_split_rows_keeps_shared_values_and_refuses_paired_rows():
    b = {"input_ids": torch.arange(12).view(6, 2), "norm": torch.tensor(3.0), "tag": "x"}
    parts = split_rows(b, 2)
    assert [p["input_ids"].tolist() for p in parts] == [[[0, 1], [2, 3], [4, 5]], [[6, 7], [8, 9], [10, 11]]]
    assert all(p["norm"] is b["norm"] and p["tag"] == "x" for p in parts)
    with pytest.raises(ValueError, match="ref_chosen"):
        split_rows({"input_ids": torch.zeros(4, 2), "ref_chosen": torch.zeros(2)}, 2)


def test_memory_is_logged_on_cuda_only(monkeypatch, tmp_path):
    assert memory_stats("cpu") == {}
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev=None: 3 * GIB // 2)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda dev=None: 5 * GIB)
    assert memory_stats("cuda:0") == {"mem_allocated_gib": 1.5, "mem_peak_gib": 5.0}
    trainer = Trainer(_cfg(max_steps=2), _model(), tmp_path / "r", total_steps=2, dist_env=DistEnv())
    trainer.fit(lambda step, micro: _batch(step), sft_loss)
    records = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert records and all("mem_allocated_gib" not in r for r in records)  # CPU: no figure rather than a made-up one


def test_memory_creep_warns_once_on_steady_growth_only():
    def warnings(series):
        creep = MemoryCreep(window=5, min_growth=0.02, warmup=2)
        return [w for i, x in enumerate(series) if (w := creep.observe(x * GIB, step=10 * i))]

    assert warnings([1, 3, 5] + [6.0] * 20) == []  # warm-up growth, then flat: the healthy run
    assert warnings([6.0, 6.1, 5.9, 6.2, 6.0, 6.1, 5.95, 6.15] * 3) == []  # noise around a level
    assert warnings([6.0] * 4 + [8.0] * 10) == []  # one step up (a longer batch), then flat
    assert warnings([6.0, 6.0, 6.0, 6.001, 6.002, 6.003, 6.004, 6.005, 6.006]) == []  # too little to matter
    leak = [6.0, 6.0] + [6.0 + 0.1 * i for i in range(20)]
    found = warnings(leak)
    assert len(found) == 1 and "grew at each of the last 5 log points" in found[0] and "6.00 -> 6.50 GiB" in found[0]


@pytest.mark.gpu
def test_cuda_run_log_reports_allocated_and_peak_memory(tmp_path):
    trainer = Trainer(_cfg(device="cuda", precision="bf16", max_steps=2), _model(), tmp_path / "g", total_steps=2,
                      dist_env=DistEnv(device="cuda"))
    trainer.fit(lambda step, micro: _batch(step), sft_loss)
    records = [json.loads(x) for x in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert train and all(0 < r["mem_allocated_gib"] <= r["mem_peak_gib"] for r in train)


# ----------------------------------------------------------------------- item 5's done-means: DDP tests, free ports


def test_multi_process_tests_take_a_free_port_not_a_fixed_one():
    fixed = re.compile(r"""master[_-]port["']?\s*[,=:]\s*["']?\d{2,}|MASTER_PORT["']?\s*[\],:=]\s*["']\d""")
    offenders = [f"{p.name}:{i}" for p in sorted((REPO / "tests").glob("*.py")) if p.name != Path(__file__).name
                 for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if fixed.search(line)]
    assert offenders == []
