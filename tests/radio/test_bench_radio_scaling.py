"""scripts/bench_radio_scaling.py: the scaling-efficiency arithmetic, and a 1 -> 2 process run on CPU (~15 s)."""

from __future__ import annotations

import json

import pytest


def _run(world: int, img_per_s: float, resolutions=(432, 1024)) -> dict:
    rows = [{"resolution": r, "batch": 64, "img_per_s": img_per_s * world, "step_ms": 64e3 / img_per_s,
             "mfu": 0.4, "peak_gib": 19.0 - world} for r in resolutions]
    return {"meta": {"world_size": world}, "rows": rows}


def test_scaling_efficiency_is_throughput_over_n_times_the_one_gpu_run(load_script):
    bench = load_script("bench_radio_scaling")
    rows = bench.scaling_rows(_run(1, 300.0), _run(2, 285.0))
    assert [r["resolution"] for r in rows] == [432, 1024]
    assert rows[0]["efficiency"] == pytest.approx(570.0 / (2 * 300.0))
    assert (rows[0]["img_per_s_1"], rows[0]["img_per_s_n"], rows[0]["gpus"]) == (300.0, 570.0, 2)
    assert (rows[0]["peak_gib_1"], rows[0]["peak_gib_n"]) == (18.0, 17.0)
    with pytest.raises(ValueError, match="missing from the 1-GPU run"):
        bench.scaling_rows(_run(1, 300.0, (432,)), _run(2, 285.0))
    with pytest.raises(ValueError, match="expected 1"):
        bench.scaling_rows(_run(2, 300.0), _run(2, 285.0))


def test_tiny_scaling_run_on_cpu(load_script, tmp_path, capsys):
    """Two gloo processes run the bench's step under DDP; rank 0 reports all ranks' images."""
    out = tmp_path / "scaling.json"
    assert load_script("bench_radio_scaling").main(["--gpus", "2", "--tiny", "--json", str(out), "--",
                                                    "--points", "low"]) == 0
    result = json.loads(out.read_text())
    assert result["many"]["meta"]["world_size"] == 2 and result["one"]["meta"]["world_size"] == 1
    (row,) = result["rows"]
    assert row["gpus"] == 2 and row["efficiency"] > 0
    many = result["many"]["rows"][0]
    assert many["img_per_s"] == pytest.approx(2 * many["img_per_s_per_gpu"])
    assert "scaling efficiency" in capsys.readouterr().out
