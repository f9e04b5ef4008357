"""Two-process launches of scripts/train_toy.py on CPU: run, checkpoint, get SIGKILLed, resume, and
continue with exactly the per-step losses of an uninterrupted run.

- torchrun + DDP (gloo): default suite (~20 s).
- DeepSpeed ZeRO-2: the uninterrupted reference under ``torchrun`` (processes calling
  ``deepspeed.initialize``), the killed and the resumed runs under the ``deepspeed --num_gpus 2``
  launcher (DeepSpeed's CPU accelerator, gloo). Marked slow (~40 s, plus ~30 s the first time DeepSpeed
  compiles its CPU shm-comm op on a machine).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mmfm.distributed import find_free_port
from mmfm.logging_utils import read_jsonl

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "train_toy.py"
COMMON = ["--no-progress", "steps=6", "ckpt_every=2", "batch_size=8", "engine.grad_accum=2",
          "engine.ema_decay=0.9"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _torchrun(out: Path, *extra: str, overrides: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(find_free_port()), str(SCRIPT), "--out", str(out),
           *(COMMON if overrides else ["--no-progress"]), *extra]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)


def _deepspeed(out: Path, *extra: str) -> subprocess.CompletedProcess:
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(find_free_port()), str(SCRIPT),
           "--out", str(out), *COMMON, *extra]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)


def _check(ok: subprocess.CompletedProcess) -> None:
    assert ok.returncode == 0, f"launch failed (rc={ok.returncode}):\n{ok.stdout[-3000:]}\n{ok.stderr[-3000:]}"


def _kill_resume_compare(reference: Path, run, out: Path, extra: tuple[str, ...]) -> None:
    killed = run(out, *extra, "--crash-after", "3")
    assert killed.returncode != 0, "the --crash-after run should have died from SIGKILL"
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 1, 2]
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000002"]
    resumed = run(out, *extra, "--resume")
    _check(resumed)
    assert "resumed from" in resumed.stdout and "step_00000002" in resumed.stdout
    expected = read_jsonl(reference / "metrics.jsonl")
    got = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(6))
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]  # bitwise
    assert [r["lr"] for r in got] == [r["lr"] for r in expected]
    assert expected[-1]["loss"] < expected[0]["loss"]
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000004", "step_00000006"]  # keep_last=2
    for name in ("rank00000.pt", "rank00001.pt", "model.safetensors", "ema.safetensors", "meta.json"):
        assert (out / "checkpoints" / "step_00000006" / name).is_file()


def test_torchrun_ddp_kill_and_resume(tmp_path):
    # The reference takes its settings from a YAML --config, the other runs from overrides: same config.
    recipe = tmp_path / "toy.yaml"
    recipe.write_text("steps: 6\nckpt_every: 2\nbatch_size: 8\nengine:\n  grad_accum: 2\n  ema_decay: 0.9\n")
    ref = _torchrun(tmp_path / "ref", "--config", str(recipe), overrides=False)
    _check(ref)
    _kill_resume_compare(tmp_path / "ref", _torchrun, tmp_path / "run", ())


@pytest.mark.slow
def test_deepspeed_launcher_kill_and_resume(tmp_path):
    pytest.importorskip("deepspeed")
    ds = ("--deepspeed", str(ROOT / "configs" / "deepspeed" / "zero2.json"))
    ref = _torchrun(tmp_path / "ref", *ds)
    _check(ref)
    assert (tmp_path / "ref" / "checkpoints" / "step_00000006" / "deepspeed").is_dir()
    _kill_resume_compare(tmp_path / "ref", _deepspeed, tmp_path / "run", ds)
