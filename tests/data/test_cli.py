"""`mmfm data` command line: help, synth -> shards readable by plain webdataset, inspect, tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import webdataset as wds

from mmfm.cli import main


def test_python_m_mmfm_data_help():
    out = subprocess.run([sys.executable, "-m", "mmfm", "data", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for command in ("synth", "inspect", "tokenizer"):
        assert command in out


def test_data_alone_prints_help(capsys):
    assert main(["data"]) == 0
    assert "synth" in capsys.readouterr().out


def test_synth_help_lists_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["data", "synth", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--kind", "--n", "--out", "--seed", "--samples-per-shard", "--image-size", "--caption-style"):
        assert opt in out


@pytest.mark.parametrize("kind,schema", [("images", "ImageSample"), ("vqa", "ConversationSample")])
def test_synth_then_inspect(tmp_path, capsys, kind, schema):
    pytest.importorskip("mmfm.data.synth")
    out_dir = tmp_path / kind
    assert main(["data", "synth", "--kind", kind, "--n", "5", "--out", str(out_dir), "--seed", "1",
                 "--samples-per-shard", "2", "--image-size", "64"]) == 0
    shards = sorted(out_dir.glob("shard-*.tar"))
    assert len(shards) == 3
    # Plain webdataset reads them.
    keys = [s["__key__"] for s in wds.WebDataset([str(p) for p in shards], shardshuffle=False)]
    assert len(keys) == 5 and len(set(keys)) == 5
    capsys.readouterr()
    assert main(["data", "inspect", str(out_dir), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shards"] == 3 and summary["raw_samples"] == 5 and summary["samples"] == 5
    assert summary["types"] == {schema: 5} and summary["skipped"] == {}


def test_synth_grounded_captions(tmp_path):
    from mmfm.data.schemas import ImageSample
    from mmfm.data.synth import grounded_caption, sample_scene

    assert main(["data", "synth", "--kind", "images", "--n", "3", "--out", str(tmp_path), "--seed", "4",
                 "--image-size", "64", "--caption-style", "grounded"]) == 0
    samples = [ImageSample.from_wds(s) for s in wds.WebDataset(sorted(map(str, tmp_path.glob("*.tar"))),
                                                                 shardshuffle=False)]
    assert [s.caption for s in samples] == [grounded_caption(sample_scene("images", i, seed=4, image_size=64))
                                            for i in range(3)]


def test_inspect_reports_bad_samples(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from mmfm.data.schemas import ImageSample
    from mmfm.data.shards import write_shards

    img = Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8))
    samples = [ImageSample(key=f"k{i}", image=img).to_wds() for i in range(3)]
    samples[1]["png"] = b"not a png"
    write_shards(samples, tmp_path)
    assert main(["data", "inspect", str(tmp_path / "shard-000000.tar")]) == 0
    out = capsys.readouterr().out
    assert "3 raw samples" in out and "decoded (auto): 2" in out and "corrupt_image=1" in out
    assert "png=3" in out and "json=3" in out


def test_tokenizer_command(tmp_path, capsys):
    pytest.importorskip("mmfm.data.synth")
    from mmfm.data.tokenizer import load_tokenizer

    assert main(["data", "tokenizer", "--out", str(tmp_path / "tok"), "--vocab-size", "400",
                 "--n-scenes", "20"]) == 0
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.convert_tokens_to_ids("<image>") != tok.unk_token_id
    assert "wrote tokenizer" in capsys.readouterr().out
