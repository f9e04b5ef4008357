"""mmfm.training: schedule, accumulation, clipping, EMA, non-finite losses, exact resume (with and
without DeepSpeed), and mmfm.logging_utils."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmfm.distributed import (
    all_reduce_mean,
    barrier,
    cleanup_distributed,
    find_free_port,
    get_rank,
    get_world_size,
    is_main_process,
    seed_everything,
)
from mmfm.logging_utils import MetricLogger, plot_loss_curves, read_jsonl
from mmfm.training import (
    Engine,
    NonFiniteLossError,
    OptimizerConfig,
    cosine_schedule,
    load_deepspeed_config,
)

ZERO2 = Path(__file__).resolve().parents[2] / "configs" / "deepspeed" / "zero2.json"


def _model(dropout: float = 0.2) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Dropout(dropout), nn.Linear(16, 3))


def _batch(step: int, micro: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)


def _opt_cfg(total: int) -> OptimizerConfig:
    return OptimizerConfig(lr=0.05, weight_decay=0.1, warmup_steps=2, total_steps=total, min_lr_ratio=0.1)


def _train(ckpt_dir, *, total, stop=None, resume=False, **engine_kw):
    """Train to ``stop`` (then checkpoint) or ``total``; returns (per-step losses, engine)."""
    torch.manual_seed(7 if resume else 0)  # a resumed run starts from other weights and RNG on purpose
    engine = Engine(_model(), _opt_cfg(total), **engine_kw)
    start = 0
    if resume:
        start = int(engine.load_checkpoint(ckpt_dir).extra["data_step"])
    losses = []
    for step in range(start, stop or total):
        per_micro = []
        for micro in range(engine.grad_accum):
            x, y = _batch(step, micro)
            loss = F.mse_loss(engine.forward(x).float(), y)
            engine.backward(loss)
            engine.step()
            per_micro.append(loss.item())
        losses.append(sum(per_micro) / len(per_micro))
    if stop is not None:
        engine.save_checkpoint(ckpt_dir, extra={"data_step": stop}, keep_last=2)
    return losses, engine


def test_cosine_schedule_matches_definition():
    w, t, m = 4, 24, 0.1
    assert cosine_schedule(0, w, t, m) == pytest.approx(0.25)
    assert cosine_schedule(3, w, t, m) == pytest.approx(1.0)
    assert cosine_schedule(w, w, t, m) == pytest.approx(1.0)
    assert cosine_schedule(w + (t - w) // 2, w, t, m) == pytest.approx(m + (1 - m) * 0.5)
    assert cosine_schedule(t, w, t, m) == pytest.approx(m)
    assert cosine_schedule(10 * t, w, t, m) == pytest.approx(m)
    s = 9
    assert cosine_schedule(s, w, t, m) == pytest.approx(m + (1 - m) * (1 + math.cos(math.pi * (s - w) / (t - w))) / 2)
    assert cosine_schedule(5, 0, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    with pytest.raises(ValueError, match="total_steps"):
        cosine_schedule(0, 0, 0)


def test_engine_matches_hand_written_adamw_loop_with_accumulation():
    """grad_accum=2 over half batches == a plain AdamW loop (decay split, clipping, schedule) on full batches."""
    steps, cfg = 5, _opt_cfg(5)
    torch.manual_seed(0)
    ref = _model(dropout=0.0)
    torch.manual_seed(0)
    engine = Engine(_model(dropout=0.0), cfg, grad_clip=0.5, grad_accum=2)
    decay = [p for p in ref.parameters() if p.ndim > 1]
    no_decay = [p for p in ref.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    for step in range(steps):
        x, y = _batch(step, 0, n=16)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * cosine_schedule(step, cfg.warmup_steps, cfg.total_steps, cfg.min_lr_ratio)
        opt.zero_grad()
        F.mse_loss(ref(x), y).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt.step()
        for half in (slice(0, 8), slice(8, 16)):
            engine.backward(F.mse_loss(engine.forward(x[half]), y[half]))
            took = engine.step()
        assert took and engine.global_step == step + 1
        assert engine.last_grad_norm == pytest.approx(float(ref_norm), rel=1e-5)
    for p_ref, p in zip(ref.parameters(), engine.module.parameters()):
        torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-6)


def test_ema_matches_reference():
    torch.manual_seed(0)
    engine = Engine(_model(0.0), _opt_cfg(4), ema_decay=0.9)
    ref = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    for step in range(4):
        x, y = _batch(step, 0)
        engine.backward(F.mse_loss(engine.forward(x), y))
        engine.step()
        for n, p in engine.module.named_parameters():
            ref[n] = 0.9 * ref[n] + 0.1 * p.detach()
    for n, t in engine.ema.state_dict().items():
        torch.testing.assert_close(t, ref[n], rtol=1e-6, atol=1e-7)
    sd = engine.ema.model_state_dict(engine.module)
    assert set(sd) == set(engine.module.state_dict())


def test_nonfinite_loss_raise_and_skip():
    torch.manual_seed(0)
    engine = Engine(_model(0.0), _opt_cfg(10))
    for step in range(2):
        x, y = _batch(step, 0)
        engine.backward(F.mse_loss(engine.forward(x), y))
        engine.step()
    x, y = _batch(2, 0)
    with pytest.raises(NonFiniteLossError, match="optimizer step 2"):
        engine.backward(F.mse_loss(engine.forward(x), y) * float("nan"))

    torch.manual_seed(0)
    engine = Engine(_model(0.0), _opt_cfg(10), on_nonfinite="skip", grad_accum=1)
    before = [p.detach().clone() for p in engine.module.parameters()]
    engine.backward(F.mse_loss(engine.forward(x), y) * float("inf"))
    assert engine.step()
    assert (engine.skipped_microbatches, engine.skipped_steps, engine.global_step) == (1, 1, 1)
    for b, p in zip(before, engine.module.parameters()):
        assert torch.equal(b, p)  # no optimizer step: not even weight decay moved the weights
    engine.backward(F.mse_loss(engine.forward(x), y))
    engine.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, engine.module.parameters()))
    with pytest.raises(ValueError, match="scalar"):
        engine.backward(torch.ones(3))


def _adam_steps(engine: Engine) -> list[float]:
    return [float(st["step"]) for st in engine.optimizer.state.values()]


def test_device_nonfinite_check_matches_the_host_path():
    """Finite steps: the same weights and gradient norms as the host path (fused vs foreach AdamW: float
    rounding only), with clipping and accumulation."""
    engines = []
    for check in ("host", "device"):
        torch.manual_seed(0)
        engines.append(Engine(_model(0.0), _opt_cfg(6), grad_clip=0.5, grad_accum=2, nonfinite_check=check))
    host, device = engines
    for step in range(4):
        for micro in range(2):
            x, y = _batch(step, micro)
            for e in engines:
                e.backward(F.mse_loss(e.forward(x), y))
                e.step()
        device.settle(step)
        assert device.last_grad_norm == pytest.approx(host.last_grad_norm, rel=1e-5)
    assert device.skipped_steps == 0 and device.global_step == 4
    for p_host, p in zip(host.module.parameters(), device.module.parameters()):
        torch.testing.assert_close(p, p_host, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_device_nonfinite_check_skips_the_step_on_the_device(policy):
    torch.manual_seed(0)
    engine = Engine(_model(0.0), _opt_cfg(10), on_nonfinite=policy, nonfinite_check="device")
    for step in range(2):
        x, y = _batch(step, 0)
        engine.backward(F.mse_loss(engine.forward(x), y))
        engine.step()
    engine.settle()
    before = [p.detach().clone() for p in engine.module.parameters()]
    moments = [st["exp_avg"].clone() for st in engine.optimizer.state.values()]
    x, y = _batch(2, 0)
    engine.backward(F.mse_loss(engine.forward(x), y) * float("nan"))
    assert engine.step()  # nothing is read on the host: no error yet
    for b, p in zip(before, engine.module.parameters()):
        assert torch.equal(b, p)  # skipped on the device: not even weight decay moved the weights
    for m, st in zip(moments, engine.optimizer.state.values()):
        assert torch.equal(m, st["exp_avg"])
    assert _adam_steps(engine) == [2.0] * len(moments)
    if policy == "raise":
        with pytest.raises(NonFiniteLossError, match="optimizer step 2 .*skipped"):
            engine.settle()
        return
    engine.settle()
    assert (engine.skipped_steps, engine.skipped_microbatches, engine.global_step) == (1, 0, 3)
    assert math.isnan(engine.last_grad_norm)
    engine.backward(F.mse_loss(engine.forward(x), y))
    engine.step()
    assert _adam_steps(engine) == [3.0] * len(moments)
    assert all(not torch.equal(b, p) for b, p in zip(before, engine.module.parameters()))
    assert engine.state_dict()["skipped_steps"] == 1


def test_device_nonfinite_check_reads_nothing_on_the_host(no_host_reads):
    """The point of nonfinite_check='device': forward, backward and step never copy a value to the host
    (each such read waits for the GPU), with accumulation and clipping."""
    torch.manual_seed(0)
    engine = Engine(_model(0.0), _opt_cfg(10), grad_clip=1.0, grad_accum=2, nonfinite_check="device")
    batches = [_batch(s, m) for s in range(2) for m in range(2)]
    with no_host_reads():
        for x, y in batches:
            engine.backward(F.mse_loss(engine.forward(x), y))
            engine.step()
    engine.settle()
    assert engine.global_step == 2 and math.isfinite(engine.last_grad_norm)


def test_device_nonfinite_check_is_refused_with_deepspeed():
    with pytest.raises(ValueError, match="nonfinite_check='device' needs the plain PyTorch path"):
        Engine(_model(0.0), _opt_cfg(4), deepspeed_config=str(ZERO2), nonfinite_check="device")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_is_exact_without_deepspeed(tmp_path, precision):
    kw = dict(precision=precision, grad_clip=1.0, grad_accum=2, ema_decay=0.95)
    full, eng_full = _train(tmp_path / "unused", total=8, **kw)
    first, _ = _train(tmp_path / "ck", total=8, stop=3, **kw)
    rest, eng_res = _train(tmp_path / "ck", total=8, resume=True, **kw)
    assert first + rest == full  # bitwise: same data position, RNG, optimizer, schedule
    for a, b in zip(eng_full.module.parameters(), eng_res.module.parameters()):
        assert torch.equal(a, b)
    for n, t in eng_full.ema.state_dict().items():
        assert torch.equal(t, eng_res.ema.state_dict()[n])
    assert eng_res.global_step == 8


def test_bf16_close_to_fp32(tmp_path):
    fp32, _ = _train(tmp_path, total=4, precision="fp32")
    bf16, _ = _train(tmp_path, total=4, precision="bf16")
    assert bf16 != fp32  # autocast really ran in bf16
    for a, b in zip(fp32, bf16):
        assert b == pytest.approx(a, rel=3e-2)


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_resume_is_exact_with_deepspeed(tmp_path, monkeypatch, zero):
    pytest.importorskip("deepspeed")
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MASTER_PORT", str(find_free_port()))
    ds_cfg = ZERO2.with_name(f"{zero}.json")
    try:
        # EMA needs full parameters on each rank: ZeRO-2 only
        kw = dict(deepspeed_config=str(ds_cfg), grad_clip=1.0, grad_accum=2,
                  ema_decay=0.95 if zero == "zero2" else None)
        full, eng_full = _train(tmp_path / "unused", total=6, **kw)
        first, _ = _train(tmp_path / "ck", total=6, stop=2, **kw)
        rest, eng_res = _train(tmp_path / "ck", total=6, resume=True, **kw)
        assert eng_full.uses_deepspeed and eng_full.zero_stage == int(zero[-1])
        assert first + rest == full
        sd_full, sd_res = eng_full.model_state_dict(), eng_res.model_state_dict()
        assert sd_full.keys() == sd_res.keys() and len(sd_full) == 4
        for k in sd_full:
            assert torch.equal(sd_full[k], sd_res[k])
        ck = sorted((tmp_path / "ck").glob("step_*"))[-1]
        assert (ck / "deepspeed").is_dir() and (ck / "model.safetensors").is_file()
        # DeepSpeed and plain PyTorch implement the same recipe (LR schedule, clipping, accumulation)
        plain, _ = _train(tmp_path / "unused", total=6, grad_clip=1.0, grad_accum=2)
        for a, b in zip(plain, full):
            assert b == pytest.approx(a, rel=1e-4)
    finally:
        cleanup_distributed()


def test_load_deepspeed_config_fills_auto(tmp_path):
    cfg = load_deepspeed_config(ZERO2, precision="bf16", grad_clip=None, grad_accum=4, micro_batch_size=2)
    assert cfg["gradient_accumulation_steps"] == 4 and cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_clipping"] == 0.0 and cfg["bf16"]["enabled"] is True
    bad = json.loads(ZERO2.read_text()) | {"optimizer": {"type": "AdamW"}}
    with pytest.raises(ValueError, match="'optimizer'"):
        load_deepspeed_config(bad, precision="fp32", grad_clip=1.0, grad_accum=1, micro_batch_size=1)
    with pytest.raises(ValueError, match="zero_optimization.stage"):
        load_deepspeed_config(
            {"zero_optimization": {"stage": "auto"}}, precision="fp32", grad_clip=1.0, grad_accum=1,
            micro_batch_size=1,
        )
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_deepspeed_config(tmp_path / "nope.json", precision="fp32", grad_clip=1.0, grad_accum=1,
                              micro_batch_size=1)


def test_metric_logger_resume_and_plot(tmp_path):
    with MetricLogger(tmp_path, total_steps=5, progress=True) as log:
        for s in range(5):
            log.log(s, loss=torch.tensor(1.0 / (s + 1)), lr=0.1)
            log.advance()
    with MetricLogger(tmp_path, total_steps=5, start_step=3, progress=False) as log:
        log.log(3, loss=0.5)
    steps = [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")]
    assert steps == [0, 1, 2, 3]
    assert list((tmp_path / "tb").glob("events.out.tfevents*"))
    png = plot_loss_curves(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="nope"):
        plot_loss_curves(tmp_path / "metrics.jsonl", tmp_path / "x.png", keys=("nope",))
    with MetricLogger(tmp_path / "o", progress=False, tensorboard=False) as log:
        with pytest.raises(TypeError, match="'loss'"):
            log.log(0, loss="high")


def test_single_process_distributed_helpers():
    assert (get_rank(), get_world_size(), is_main_process()) == (0, 1, True)
    t = torch.tensor([1.0, 3.0])
    assert torch.equal(all_reduce_mean(t), t) and all_reduce_mean(t) is not t
    assert all_reduce_mean(torch.tensor(3)).dtype == torch.float32
    barrier()  # no-op without a process group
    assert seed_everything(5, rank=2) == 7
    a = (random.random(), float(np.random.rand()), torch.rand(2).tolist())
    seed_everything(5, rank=2)
    assert (random.random(), float(np.random.rand()), torch.rand(2).tolist()) == a
    with pytest.raises(ValueError, match="seed"):
        seed_everything(-1)
