"""Distillation trainer (mmfm.radio.distill): one step per loss / normaliser / balancing option, mosaic
stitching against a manual reference, exact in-process resume, export -> mmfm.radio.load round trip."""

from __future__ import annotations

import contextlib
import copy
import random
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from mmfm.logging_utils import read_jsonl
from mmfm.radio.distill import (
    BalancingConfig,
    DataConfig,
    LossConfig,
    NormalizerSchedule,
    PartitionConfig,
    RadioTrainConfig,
    StepPlan,
    StudentConfig,
    TargetMaker,
    TeacherInfo,
    build_batch,
    build_upsamplers,
    compile_models,
    compile_repeated_blocks,
    feature_terms,
    fit_normalizers_initial,
    plan_step,
    run_teacher,
    setup,
    stitch_tiles,
    teacher_space_predictor,
    train,
)
from mmfm.radio.flops import count_step_flops, dense_bf16_peak_tflops, model_flops_paths, possible_plans
from mmfm.radio.teachers import TeacherSpec
from mmfm.training import Engine, EngineConfig, OptimizerConfig


def _vit(name: str, width: int, patch: int, input_size: int, **kw) -> TeacherSpec:
    """A tiny random-init timm ViT teacher."""
    return TeacherSpec(name=name, family="timm", model_name="vit_tiny_patch16_224", input_size=input_size,
                       model_kwargs={"embed_dim": width, "depth": 1, "num_heads": 2, "patch_size": patch,
                                     "dynamic_img_size": True}, **kw)


def _sam(name: str, width: int, input_size: int, **kw) -> TeacherSpec:
    """A tiny random-init timm SAM ViT teacher (NCHW neck output, no summary)."""
    return TeacherSpec(name=name, family="timm", model_name="samvit_base_patch16", input_size=input_size,
                       use_summary=False, model_kwargs={"embed_dim": 16, "depth": 1, "num_heads": 2,
                                                        "global_attn_indexes": [0], "window_size": 2,
                                                        "neck_chans": width}, **kw)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from mmfm.data.synth import write_synthetic

    d = tmp_path_factory.mktemp("imgs")
    write_synthetic("images", 48, d / "train", seed=0, image_size=64, samples_per_shard=24)
    write_synthetic("images", 8, d / "eval", seed=1, image_size=64)
    return d


def _cfg(shards, **kw) -> RadioTrainConfig:
    cfg = RadioTrainConfig(
        seed=0,
        teachers=[_vit("a", 24, 16, 32), _vit("b", 16, 8, 32, match_student_resolution=True),
                  _sam("c", 16, 64, partitions=["high"])],
        student=StudentConfig(size="tiny", patch_size=16, num_registers=1, adaptor_hidden=32,
                              overrides={"max_resolution": 128}),
        data=DataConfig(train_shards=str(shards / "train"), shuffle_buffer=8),
        partitions=[PartitionConfig("low", [32, 48], 0.5, 4),
                    PartitionConfig("high", [64], 0.5, 2, mosaic_k=2, mosaic_prob=0.5)],
        normalizer_schedule=NormalizerSchedule(init_batches=2, refit_every=2, refit_until=4),
        engine=EngineConfig(optimizer=OptimizerConfig(lr=1e-3, warmup_steps=2, total_steps=8)),
        steps=4, ckpt_every=2, export=False)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _one_step(cfg: RadioTrainConfig, plan: StepPlan, guard=contextlib.nullcontext,
              device: str = "cpu") -> tuple[dict, nn.Module, dict]:
    """One training step (teachers, moments, targets, student, optimizer) on a fresh setup; ``guard()`` wraps
    the step."""
    teachers, infos, model, norms = setup(cfg, device)
    maker = TargetMaker(cfg, teachers, infos, norms, torch.device(device), build_upsamplers(cfg, teachers))
    fit_normalizers_initial(cfg, maker)
    before = copy.deepcopy(model.state_dict())
    engine = Engine.from_config(model, cfg.engine)
    from mmfm.radio.distill import SampleStream, samples_needed

    stream = SampleStream(cfg.data.train_shards, 0, 0)
    images, units = build_batch(stream.take(samples_needed(cfg, plan)), plan, cfg.student.patch_size)
    images, units = images.to(device), units.to(device)
    with guard():
        raw = maker.teacher_outputs(plan, units)
        maker.observe(raw)
        out = engine.forward(images, maker.targets(plan, raw))
        engine.backward(out["loss"])
        engine.step()
    engine.settle()
    return out, model, before


@pytest.mark.parametrize("feature,normalizer,balancing,match", [
    ("mse", "phi_s", "fixed", "teacher_to_student"),
    ("cos_smoothl1", "phi_s", "adaloss", "student_to_teacher"),
    ("mse", "identity", "uncertainty", "teacher_to_student"),
    ("mse", "channel", "fixed", "student_to_teacher"),
])
@pytest.mark.parametrize("mosaic", [False, True])
def test_one_step_per_option(shards, feature, normalizer, balancing, match, mosaic):
    cfg = _cfg(shards, normalizer=normalizer, loss=LossConfig(feature=feature, match=match),
               balancing=BalancingConfig(kind=balancing))
    plan = StepPlan(1, (64, 64), 2) if mosaic else StepPlan(0, (48, 48), 1)
    out, model, before = _one_step(cfg, plan)
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    # the partition's teachers give the terms: mosaic drops the summaries, "c" only trains on "high"
    expect = {"a/feature", "b/feature"} | ({"c/feature"} if mosaic else {"a/summary", "b/summary"})
    assert {k[len("loss/"):] for k in out if k.startswith("loss/")} == expect
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("encoder.student.blocks") for k in changed)
    assert any(k.startswith("encoder.adaptors.a.feature") for k in changed)


@pytest.mark.parametrize("balancing", ["fixed", "adaloss", "uncertainty"])
@pytest.mark.parametrize("mosaic", [False, True])
def test_a_step_reads_nothing_on_the_host(shards, no_host_reads, balancing, mosaic):
    """With engine.nonfinite_check: device a whole training step (teachers, moment update, targets, student,
    losses, balancing, optimizer) queues its work without one host read, so the host never waits for the GPU."""
    cfg = _cfg(shards, balancing=BalancingConfig(kind=balancing))
    cfg.engine.nonfinite_check = "device"
    plan = StepPlan(1, (64, 64), 2) if mosaic else StepPlan(0, (48, 48), 1)
    out, model, before = _one_step(cfg, plan, no_host_reads)
    assert torch.isfinite(out["loss"])
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.gpu
@pytest.mark.parametrize("mosaic", [False, True])
def test_a_step_on_the_gpu_does_not_synchronize(shards, mosaic):
    """The CUDA side of the test above: ops that wait for the GPU without a Python-level read (a nonzero, a
    copy to the host) raise under torch.cuda.set_sync_debug_mode("error")."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")

    @contextlib.contextmanager
    def no_syncs():
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")

    cfg = _cfg(shards, balancing=BalancingConfig(kind="adaloss"))
    cfg.engine.nonfinite_check = "device"
    cfg.engine.precision = "bf16"
    plan = StepPlan(1, (64, 64), 2) if mosaic else StepPlan(0, (48, 48), 1)
    out, _, _ = _one_step(cfg, plan, no_syncs, device="cuda")
    assert torch.isfinite(out["loss"])


def test_heads_of_an_absent_teacher_are_not_run_but_get_zero_gradients(shards):
    """Low partition: teacher "c" (high only) has no targets, so its feature head does not run on the tokens,
    yet every trainable parameter gets a gradient (DDP / ZeRO need that), zero for c's heads."""
    from mmfm.radio.distill import SampleStream, samples_needed

    cfg = _cfg(shards)
    teachers, infos, model, norms = setup(cfg)
    maker = TargetMaker(cfg, teachers, infos, norms, torch.device("cpu"))
    fit_normalizers_initial(cfg, maker)
    plan = StepPlan(0, (48, 48), 1)
    images, units = build_batch(SampleStream(cfg.data.train_shards, 0, 0).take(samples_needed(cfg, plan)), plan, 16)
    targets = maker.targets(plan, maker.teacher_outputs(plan, units))
    assert set(targets) == {"a", "b"}
    calls = []
    model.encoder.adaptors["c"].feature.register_forward_hook(lambda *_: calls.append(1))
    out = model(images, targets)
    out["loss"].backward()
    assert not calls
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            if name.startswith("encoder.adaptors.c."):
                assert not p.grad.any(), name
    assert model.encoder.adaptors["a"].feature is not None
    assert any(p.grad.any() for p in model.encoder.adaptors["a"].feature.parameters())


def test_featsharp_teacher_gives_finer_targets(shards, tmp_path):
    from mmfm.radio.distill import build_teachers
    from mmfm.radio.featsharp import FeatSharpUpsampler

    cfg = _cfg(shards, teachers=[_vit("a", 24, 16, 32)])
    FeatSharpUpsampler(build_teachers(cfg)["a"], 2).save(str(tmp_path / "fs.safetensors"))
    cfg.teachers[0].featsharp_checkpoint = str(tmp_path / "fs.safetensors")
    with pytest.raises(ValueError, match="upsample_factor"):
        _one_step(cfg, StepPlan(0, (48, 48), 1))
    cfg.teachers[0].upsample_factor = 2
    out, model, before = _one_step(cfg, StepPlan(0, (48, 48), 1))
    assert torch.isfinite(out["loss"]) and "loss/a/feature" in out
    assert not torch.equal(model.state_dict()["encoder.adaptors.a.feature.final.2.weight"],
                           before["encoder.adaptors.a.feature.final.2.weight"])
    assert model.encoder.adaptors["a"].upsample_factor == 2  # pixel-shuffle head: (48/16 * 2)^2 tokens
    assert model(torch.rand(1, 3, 48, 48), {})["loss"].shape == ()


def test_featsharp_checkpoint_of_another_teacher_is_named(shards, tmp_path):
    import json

    from mmfm.radio.distill import build_teachers, build_upsamplers
    from mmfm.radio.featsharp import FeatSharpUpsampler
    from mmfm.radio.featsharp_cli import TEACHER_META, _save_with_metadata, _teacher_info

    cfg = _cfg(shards, teachers=[_vit("a", 24, 16, 32)])
    teacher = build_teachers(cfg)["a"]
    up = FeatSharpUpsampler(teacher, 2)
    path = tmp_path / "fs.safetensors"
    _save_with_metadata(up, path, {TEACHER_META: json.dumps(_teacher_info(cfg.teachers[0], up))})
    cfg.teachers[0].featsharp_checkpoint, cfg.teachers[0].upsample_factor = str(path), 2
    assert set(build_upsamplers(cfg, {"a": teacher})) == {"a"}  # its own teacher loads
    other = build_teachers(_cfg(shards, seed=1, teachers=[_vit("a", 24, 16, 32)]))["a"]  # same shape, other init
    with pytest.raises(ValueError, match="featsharp_checkpoint of 'a'.*was trained for teacher"):
        build_upsamplers(cfg, {"a": other})


def test_refit_carries_adaptors_to_the_new_normalised_space(shards):
    from mmfm.radio.distill import SampleStream, samples_needed

    cfg = _cfg(shards, normalizer="phi_s")
    teachers, infos, model, norms = setup(cfg)
    maker = TargetMaker(cfg, teachers, infos, norms, torch.device("cpu"))
    fit_normalizers_initial(cfg, maker)
    model.eval()
    x = torch.rand(2, 3, 48, 48)
    predict = teacher_space_predictor(model.encoder, norms)
    before = predict(x)
    stream = SampleStream(cfg.data.train_shards, 0, 5)
    for plan in (StepPlan(1, (64, 64), 1), StepPlan(0, (32, 32), 1)):
        _, units = build_batch(stream.take(samples_needed(cfg, plan)), plan, 16)
        maker.observe(maker.teacher_outputs(plan, units))
    old_t = {n: v.transform.clone() for n, v in norms.items()}
    maker.fit(model.encoder.adaptors)
    after = predict(x)
    for name in ("a", "b", "c"):
        assert not torch.allclose(norms[name].transform, old_t[name])  # the refit moved the target space
        torch.testing.assert_close(after[name][1], before[name][1], rtol=1e-4, atol=1e-4)


def test_stitch_tiles_matches_manual_reference():
    k, b, c, h, w = 3, 2, 5, 4, 3
    tiles = torch.randn(b * k * k, c, h, w)
    got = stitch_tiles(tiles, k)
    ref = torch.zeros(b, c, k * h, k * w)
    for bi in range(b):
        for i in range(k * k):
            r, col = divmod(i, k)
            ref[bi, :, r * h:(r + 1) * h, col * w:(col + 1) * w] = tiles[bi * k * k + i]
    assert torch.equal(got, ref)


class _PatchMeanTeacher(nn.Module):
    """Test double: features = per-patch mean colour x a fixed matrix (purely local), summary = image mean."""

    def __init__(self, patch: int) -> None:
        super().__init__()
        self.patch = patch
        self.mix = nn.Parameter(torch.randn(6, 3), requires_grad=False)

    def forward(self, x):
        f = nn.functional.avg_pool2d(x, self.patch)  # (B, 3, h, w)
        return x.mean((2, 3)) @ self.mix.T, torch.einsum("oc,bchw->bohw", self.mix, f)


def test_mosaic_targets_are_placed_tile_by_tile(shards):
    # A local teacher on each tile, stitched, must equal the same teacher run on the whole mosaic (the tiles
    # align with its patches), and the summary targets must be dropped.
    cfg = _cfg(shards, teachers=[_vit("t", 8, 16, 32, match_student_resolution=True)], normalizer="identity")
    plan = StepPlan(1, (64, 64), 2)
    from mmfm.radio.distill import SampleStream

    samples = SampleStream(cfg.data.train_shards, 0, 0).take(2 * 4)
    images, units = build_batch(samples, plan, 16)
    assert images.shape == (2, 3, 64, 64) and units.shape == (8, 3, 32, 32)
    assert torch.equal(images[1, :, 32:, :32], units[4 + 2])  # tile 2 (row 1, col 0) of image 1
    teacher = _PatchMeanTeacher(16)
    maker = TargetMaker(cfg, {"t": teacher}, {"t": TeacherInfo(3, 6, 16)}, {}, torch.device("cpu"))
    targets = maker.targets(plan, maker.teacher_outputs(plan, units))
    assert set(targets["t"]) == {"features"}
    _, whole = teacher(images)
    torch.testing.assert_close(targets["t"]["features"], whole, rtol=0, atol=1e-6)


def test_possible_plans_are_the_plans_steps_draw(shards):
    cfg = _cfg(shards)
    plans = possible_plans(cfg)
    assert set(plans) == {StepPlan(0, (32, 32), 1), StepPlan(0, (48, 48), 1), StepPlan(1, (64, 64), 1),
                          StepPlan(1, (64, 64), 2)}
    assert {plan_step(cfg, s) for s in range(400)} == set(plans)
    cfg.partitions[1].mosaic_prob = 1.0  # every high step is a mosaic
    cfg.partitions[0].probability = 0.0
    assert possible_plans(cfg) == [StepPlan(1, (64, 64), 2)]


@pytest.mark.parametrize("plan", [StepPlan(0, (48, 48), 1), StepPlan(1, (64, 64), 2)])
def test_step_flops_equal_those_of_a_counted_training_step(shards, plan):
    """count_step_flops (one image, scaled) against the FLOP counter around a real micro-batch: the teachers on
    the batch's pictures and the student's forward + backward through the loss; RNG and gradients untouched."""
    from torch.utils.flop_counter import FlopCounterMode

    from mmfm.radio.distill import SampleStream, samples_needed

    cfg = _cfg(shards)
    teachers, infos, model, norms = setup(cfg)
    maker = TargetMaker(cfg, teachers, infos, norms, torch.device("cpu"))
    fit_normalizers_initial(cfg, maker)
    rng = torch.get_rng_state()
    flops = count_step_flops(maker, model.encoder, plan)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())

    images, units = build_batch(SampleStream(cfg.data.train_shards, 0, 0).take(samples_needed(cfg, plan)), plan,
                                cfg.student.patch_size)
    with FlopCounterMode(display=False) as fc, model_flops_paths(teachers.values()):  # the models' own FLOPs
        raw = maker.teacher_outputs(plan, units)
    assert set(flops.teachers) == set(raw) and flops.teacher == pytest.approx(fc.get_total_flops(), rel=1e-9)
    targets = maker.targets(plan, raw)
    with FlopCounterMode(display=False) as fc:
        model(images, targets)["loss"].backward()
    assert flops.student == pytest.approx(fc.get_total_flops(), rel=1e-9)
    assert flops.total == flops.teacher + flops.student > 0


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                       ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("Tesla T4", None)])
def test_dense_bf16_peak_by_gpu_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert dense_bf16_peak_tflops("cuda") == peak
    assert dense_bf16_peak_tflops("cpu") is None


def test_plan_is_deterministic_and_follows_probabilities(shards):
    cfg = _cfg(shards)
    plans = [plan_step(cfg, s) for s in range(400)]
    assert plans == [plan_step(cfg, s) for s in range(400)]
    high = [p for p in plans if p.partition == 1]
    assert 0.4 < len(high) / 400 < 0.6
    assert all(p.resolution == (64, 64) for p in high)
    assert 0.3 < sum(p.is_mosaic for p in high) / len(high) < 0.7
    assert {p.resolution for p in plans if p.partition == 0} == {(32, 32), (48, 48)}
    assert not any(p.is_mosaic for p in plans if p.partition == 0)


@pytest.mark.parametrize("name", ["tiny-cpu", "vit-b16-clip-dino-sam"])
def test_recipes_parse(name):

    from mmfm.config import load_config

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(RadioTrainConfig, root / "configs" / "radio" / f"{name}.yaml")
    cfg.validate()
    assert len(cfg.teachers) == 3 and {t.family for t in cfg.teachers} >= {"open_clip", "timm"}


def test_config_errors_name_the_field(shards):
    with pytest.raises(ValueError, match="multiple of 32"):
        _cfg(shards, partitions=[PartitionConfig("high", [48], 1.0, 2, mosaic_k=2, mosaic_prob=1.0)]).validate()
    with pytest.raises(ValueError, match="unknown partitions"):
        _cfg(shards, partitions=[PartitionConfig("low", [32], 1.0, 2)]).validate()
    with pytest.raises(ValueError, match="teachers is empty"):
        _cfg(shards, teachers=[]).validate()


def test_resume_is_exact_in_process(shards, tmp_path):
    cfg = _cfg(shards, steps=6)
    train(cfg, tmp_path / "ref", progress=False)
    short = _cfg(shards, steps=3, ckpt_every=3)
    train(short, tmp_path / "run", progress=False)
    random.seed(123)
    torch.manual_seed(123)  # the resume must not depend on the RNG state of the process
    resumed = _cfg(shards, steps=6)
    resumed.data.decode_threads = 2  # decoding on threads changes neither the order nor the resume position
    train(resumed, tmp_path / "run", resume=True, progress=False)
    ref = read_jsonl(tmp_path / "ref" / "metrics.jsonl")
    got = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(6))
    assert all(r["tflops"] > 0 and "mfu" not in r for r in ref)  # no MFU: a CPU has no known peak
    for r, g in zip(ref, got):
        assert set(r) == set(g)
        for key in r:
            if key not in ("img_per_s", "tflops"):  # timings
                assert g[key] == pytest.approx(r[key], abs=1e-6, rel=0), (r["step"], key)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_overlap_teachers_trains_identically(shards, tmp_path, device):
    # the next batch's teachers run ahead (on a side stream where the trainer runs on a GPU): the same losses
    # as the sequential loop
    if (device == "cuda") != torch.cuda.is_available():
        pytest.skip("the trainer runs on CUDA when there is one")
    train(_cfg(shards, steps=4, ckpt_every=4), tmp_path / "seq", progress=False)
    train(_cfg(shards, steps=4, ckpt_every=4, overlap_teachers=True), tmp_path / "ahead", progress=False)
    # and resumed half-way: the checkpoint saves the consumed batch's stream position, not the one ahead
    train(_cfg(shards, steps=2, ckpt_every=2, overlap_teachers=True), tmp_path / "resumed", progress=False)
    train(_cfg(shards, steps=4, ckpt_every=2, overlap_teachers=True), tmp_path / "resumed", resume=True,
          progress=False)
    ref = read_jsonl(tmp_path / "seq" / "metrics.jsonl")
    for run in ("ahead", "resumed"):
        got = read_jsonl(tmp_path / run / "metrics.jsonl")
        assert [g["step"] for g in got] == [r["step"] for r in ref] == list(range(4))
        for r, g in zip(ref, got):
            for key in r:
                if key.startswith(("loss", "cos", "fidelity")):
                    assert g[key] == pytest.approx(r[key], abs=1e-6, rel=0), (run, r["step"], key)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_device_nonfinite_check_trains_like_the_host_path(shards, tmp_path, device):
    """engine.nonfinite_check: device reads nothing on the host during a step, and the trainer logs each step
    after the next one is queued: every step is logged once, with the host path's values (on CPU the optimizer
    is fused on the device path only: float rounding apart)."""
    if (device == "cuda") != torch.cuda.is_available():
        pytest.skip("the trainer runs on CUDA when there is one")
    train(_cfg(shards, steps=5, ckpt_every=5), tmp_path / "host", progress=False)
    cfg = _cfg(shards, steps=5, ckpt_every=5)
    cfg.engine.nonfinite_check = "device"
    train(cfg, tmp_path / "device", progress=False)
    ref = read_jsonl(tmp_path / "host" / "metrics.jsonl")
    got = read_jsonl(tmp_path / "device" / "metrics.jsonl")
    assert [g["step"] for g in got] == [r["step"] for r in ref] == list(range(5))
    for r, g in zip(ref, got):
        assert set(r) == set(g)
        for key in r:
            if key not in ("img_per_s", "tflops"):  # timings
                assert g[key] == pytest.approx(r[key], abs=1e-5, rel=1e-5), (r["step"], key)


def test_compile_repeated_blocks_compiles_each_block_once():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])  # inside a compiled block: skipped

        def forward(self, x):
            return self.layers[1](self.layers[0](x))

    model = nn.Sequential(nn.ModuleList([Inner(), Inner(), Inner()]),
                          nn.ModuleList([nn.Linear(4, 4), nn.ReLU()]),  # mixed classes: not a block list
                          nn.Sequential(Inner(), Inner()),  # timm keeps its blocks in a Sequential
                          nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))  # leaf layers: not blocks
    keys = list(model.state_dict())
    assert compile_repeated_blocks(model) == 5
    assert all(b._compiled_call_impl is not None for b in [*model[0], *model[2]])
    assert model[0][0].layers[0]._compiled_call_impl is None and model[1][0]._compiled_call_impl is None
    assert all(m._compiled_call_impl is None for m in model[3])
    assert list(model.state_dict()) == keys  # checkpoints and export see the same names


def test_compile_models_compiles_blocks_heads_and_loss_terms(load_script):
    from mmfm.radio.adaptors import ResidualMLP

    cfg = load_script("bench_radio_train").make_config(True, 64, 128, 4, 2, "fp32")
    teachers, _, model, _ = setup(cfg, "cpu")
    heads = [m for m in model.modules() if isinstance(m, ResidualMLP)]
    assert len(heads) == 5  # clip summary + feature, dino summary + feature, sam feature
    blocks_only, _, eager_heads, _ = setup(cfg, "cpu")
    blocks = compile_models(eager_heads, blocks_only, heads_and_losses=False)
    assert eager_heads.feature_terms is feature_terms
    assert not any(m._compiled_call_impl for m in eager_heads.modules() if isinstance(m, ResidualMLP))
    assert compile_models(model, teachers) == blocks + len(heads)
    assert all(h._compiled_call_impl is not None for h in heads) and model.feature_terms is not feature_terms


@pytest.mark.parametrize("kind", ["mse", "cos_smoothl1"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5)])
def test_compiled_feature_terms_match_eager(kind, dtype, tol):
    # what compile: true runs for each teacher's feature term: the eager function is the reference (loss,
    # metrics and the gradient), on the strided (B, C, h, w) view the encoder returns; both compute in fp32
    # from the same bf16 / fp32 prediction, so only inductor's reordered sums differ
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 20, 16, generator=g).to(dtype).requires_grad_(True)
    target = torch.randn(3, 16, 4, 5, generator=g)
    compiled = torch.compile(feature_terms)
    outs, grads = [], []
    for fn in (feature_terms, compiled):
        pred = tokens.transpose(1, 2).reshape(3, 16, 4, 5)
        out = fn(pred, target, kind)
        (grad,) = torch.autograd.grad(out[0], tokens)
        assert not out[1].requires_grad and not out[2].requires_grad
        outs.append(out)
        grads.append(grad)
    for want, got in zip(outs[0], outs[1]):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    torch.testing.assert_close(grads[1].float(), grads[0].float(), atol=tol, rtol=1e-2 if dtype == torch.bfloat16
                               else tol)


@pytest.mark.slow
def test_compiled_teachers_run_their_blocks_compiled_and_match_eager(load_script):
    """The bench's tiny open_clip / timm DINOv2 / timm SAM teachers under ``compile: true``: every block class's
    forward has a dynamo cache entry after one call (the blocks did not fall back to eager), and the outputs
    equal the eager teachers' (fp32, atol 1e-4: inductor reorders float sums)."""
    bench = load_script("bench_radio_train")
    cfg = bench.make_config(True, 64, 128, 4, 2, "fp32")
    torch.manual_seed(0)
    eager, *_ = setup(cfg, "cpu")
    torch.manual_seed(0)
    compiled, _, student, _ = setup(cfg, "cpu")
    compile_models(student, compiled)
    for spec in cfg.teachers:
        x = torch.rand(2, 3, spec.input_size, spec.input_size)
        for a, b in zip(run_teacher(eager[spec.name], x), run_teacher(compiled[spec.name], x)):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    entries = bench._compiled_forwards(compiled.values())
    assert len(entries) == 3 and all(n >= 1 for n in entries.values()), entries


@pytest.mark.slow
def test_bench_compiled_blocks_sees_the_compiled_regions(load_script, tmp_path, monkeypatch):
    """scripts/bench_compiled_blocks.py --tiny: both blocks of the tiny timm ViT run as compiled regions."""
    import json
    import sys

    bench = load_script("bench_compiled_blocks")
    out = tmp_path / "row.json"
    monkeypatch.setattr(sys, "argv", ["bench_compiled_blocks", "--tiny", "--device", "cpu", "--json", str(out)])
    assert bench.main() == 0
    row = json.loads(out.read_text())
    assert row["compiled_blocks"] == 2 and row["compiled_region_calls"] == 2, row


@pytest.mark.slow
def test_profile_radio_student_tiny_runs(load_script, monkeypatch, capsys):
    import sys

    mod = load_script("profile_radio_student")
    monkeypatch.setattr(sys, "argv", ["profile_radio_student", "--tiny"])
    assert mod.main() == 0
    text = capsys.readouterr().out
    assert "backbone alone, forward + backward" in text and "top aten ops by input shape" in text


def test_compile_option_trains_like_eager(shards, tmp_path):
    # one resolution, no mosaic: every block compiles once (CPU inductor); losses agree with eager
    kw = dict(partitions=[PartitionConfig("low", [32], 1.0, 4)], steps=2, ckpt_every=2,
              teachers=[_vit("a", 24, 16, 32), _vit("b", 16, 8, 32, match_student_resolution=True)])
    train(_cfg(shards, **kw), tmp_path / "eager", progress=False)
    train(_cfg(shards, compile=True, **kw), tmp_path / "compiled", progress=False)
    ref = read_jsonl(tmp_path / "eager" / "metrics.jsonl")
    got = read_jsonl(tmp_path / "compiled" / "metrics.jsonl")
    for r, g in zip(ref, got, strict=True):
        for key in r:
            if key.startswith("loss"):
                assert g[key] == pytest.approx(r[key], rel=1e-4, abs=1e-5), (r["step"], key)


def test_export_loads_with_same_adaptor_outputs(shards, tmp_path):
    from mmfm.radio.encoder import load

    cfg = _cfg(shards, steps=2, export=True)
    train(cfg, tmp_path / "run", progress=False)
    # rebuild the live model from the last checkpoint and compare with both exports
    from mmfm.radio.train_cli import export_checkpoint

    teachers, infos, model, norms = setup(cfg)
    from mmfm.checkpoint import load_checkpoint

    ck = load_checkpoint(tmp_path / "run" / "checkpoints", restore_rng=False)
    model.load_state_dict(ck.tensors["model"])
    for n, v in norms.items():
        v.load_state_dict(ck.rank_state["normalizers"][n])
    model.eval()
    x = torch.rand(2, 3, 48, 48)
    ref = teacher_space_predictor(model.encoder, norms)(x)
    paths = export_checkpoint(tmp_path / "run", tmp_path / "exp")
    for where in (tmp_path / "run" / "model", paths["model"], paths["hf"]):
        enc = load(where, adaptors="all")
        out = enc(x, feature_fmt="NCHW")
        for name in ("a", "b", "c"):
            for got, want in zip(out[name], ref[name]):
                if want is None:
                    assert got is None
                else:
                    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ launches (slow)
def _launch_env():
    import os

    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


@pytest.mark.slow
def test_deepspeed_launch_kill_resume_is_identical(shards, tmp_path):
    """Two CPU processes under ZeRO-2: the uninterrupted reference under torchrun, then the `deepspeed
    --num_gpus 2` launcher runs, checkpoints, gets SIGKILLed after step 3, resumes and continues with the
    reference's per-step losses."""
    import shutil
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    from mmfm.distributed import find_free_port

    root = Path(__file__).resolve().parents[2]
    script = root / "scripts" / "train_radio.py"
    common = ["--config", str(root / "configs" / "radio" / "tiny-cpu.yaml"), "--no-progress",
              "--deepspeed", str(root / "configs" / "deepspeed" / "zero2.json"),
              f"data.train_shards={shards / 'train'}", "data.eval_shards=null", "data.shuffle_buffer=8",
              "steps=6", "ckpt_every=2", "export=false", "normalizer_schedule.refit_every=2",
              "normalizer_schedule.init_batches=2", "engine.optimizer.total_steps=6",
              "engine.optimizer.warmup_steps=2"]

    def run(cmd):
        return subprocess.run(cmd, cwd=root, env=_launch_env(), capture_output=True, text=True, timeout=600)

    def check(p):
        assert p.returncode == 0, f"launch failed (rc={p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(find_free_port()), str(script)]
    check(run([*torchrun, "--out", str(tmp_path / "ref"), *common]))
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    ds = [launcher, "--num_gpus", "2", "--master_port", str(find_free_port()), str(script)]
    killed = run([*ds, "--out", str(tmp_path / "run"), *common, "--crash-after", "3"])
    assert killed.returncode != 0, "the --crash-after run should have died from SIGKILL"
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [0, 1, 2]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == ["step_00000002"]
    ds[4] = str(find_free_port())
    resumed = run([*ds, "--out", str(tmp_path / "run"), *common, "--resume"])
    check(resumed)
    assert "resumed from" in resumed.stdout and "step_00000002" in resumed.stdout
    ref = read_jsonl(tmp_path / "ref" / "metrics.jsonl")
    got = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(6))
    for r, g in zip(ref, got):
        for key in r:
            if key not in ("img_per_s", "tflops"):  # timings
                assert g[key] == pytest.approx(r[key], abs=1e-6, rel=0), (r["step"], key)
    ck = tmp_path / "run" / "checkpoints" / "step_00000006"
    for name in ("rank00000.pt", "rank00001.pt", "model.safetensors", "meta.json"):
        assert (ck / name).is_file()
    assert (ck / "deepspeed").is_dir()
