"""`mmfm radio extract|pca` on a tiny saved model and PIL-generated images; PCA against numpy's SVD."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from mmfm.cli import main
from mmfm.radio import RadioEncoder, create_student, load, save
from mmfm.radio.adaptors import AdaptorSpec, MLPSpec, TeacherAdaptor
from mmfm.radio.cli import _to_tensor
from mmfm.radio.pca import pca_components, pca_rgb


def _image(seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    return Image.fromarray(arr)


@pytest.fixture()
def model_dir(tmp_path):
    torch.manual_seed(0)
    enc = RadioEncoder(create_student("tiny", num_cls_tokens=2, num_registers=1, preferred_resolution=32), adaptors={
        "sam": TeacherAdaptor(AdaptorSpec(head_idx=1, upsample_factor=2), MLPSpec(32, 16, 8), MLPSpec(32, 16, 6))})
    return save(enc, tmp_path / "model")


def test_extract_images_and_shards(tmp_path, model_dir):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        _image(i).save(imgs / f"im{i}.png")
    (imgs / "broken.png").write_bytes(b"not a png")
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in (3, 4):
            buf = io.BytesIO()
            _image(i).save(buf, format="JPEG")
            data = buf.getvalue()
            info = tarfile.TarInfo(f"s{i}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            meta = json.dumps({"i": i}).encode()
            info = tarfile.TarInfo(f"s{i}.json")
            info.size = len(meta)
            tar.addfile(info, io.BytesIO(meta))
    out = tmp_path / "feats.safetensors"
    rc = main(["radio", "extract", "--model", str(model_dir), "--input", str(imgs), str(shard), "--out", str(out),
               "--batch-size", "2", "--resolution", "32x48", "--adaptor", "sam"])
    assert rc == 0
    with safe_open(str(out), "pt") as f:
        keys = json.loads(f.metadata()["keys"])
        feats, summ, sam = f.get_tensor("features"), f.get_tensor("summary"), f.get_tensor("sam.features")
    assert keys == ["im0", "im1", "im2", "shard-000/s3", "shard-000/s4"]
    assert feats.shape == (5, 6, 32) and summ.shape == (5, 64) and sam.shape == (5, 24, 6)
    enc = load(model_dir)
    x = torch.stack([_to_tensor(Image.open(imgs / "im1.png").convert("RGB"), (32, 48))])
    with torch.no_grad():
        ref = enc(x)
    assert torch.allclose(feats[1], ref.features[0], atol=1e-5)
    assert torch.allclose(summ[1], ref.summary[0], atol=1e-5)

    npy = tmp_path / "f.npy"
    assert main(["radio", "extract", "--model", str(model_dir), "--input", str(imgs / "im1.png"), "--out",
                 str(npy), "--resolution", "45x50"]) == 0  # snapped to 48x48
    arr = np.load(npy)
    assert arr.shape == (1, 9, 32)
    assert np.load(tmp_path / "f.summary.npy").shape == (1, 64)
    assert (tmp_path / "f.keys.txt").read_text().split() == ["im1"]


def test_radio_help(capsys):
    assert main(["radio"]) == 0
    out = capsys.readouterr().out
    assert "extract" in out and "pca" in out


@pytest.mark.parametrize("command", [["train"], ["eval"], ["export"], ["featsharp"], ["featsharp", "train"],
                                     ["featsharp", "apply"]])
def test_radio_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["radio", *command, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: mmfm radio {' '.join(command)}")
    if command == ["featsharp"]:
        assert main(["radio", "featsharp"]) == 0  # the group alone prints its help
        out = capsys.readouterr().out
        assert "train" in out and "apply" in out
        assert main(["radio"]) == 0
        out = capsys.readouterr().out
        assert all(f"    {c} " in out or f"    {c}\n" in out for c in ("train", "eval", "export", "featsharp"))


def test_extract_bad_input(tmp_path, model_dir, capsys):
    rc = main(["radio", "extract", "--model", str(model_dir), "--input", str(tmp_path / "none"), "--out",
               str(tmp_path / "o.safetensors")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    _image(0).save(tmp_path / "a.png")
    rc = main(["radio", "extract", "--model", str(model_dir), "--input", str(tmp_path / "a.png"), "--out",
               str(tmp_path / "o.txt")])
    assert rc == 2 and ".safetensors or .npy" in capsys.readouterr().err
    rc = main(["radio", "extract", "--model", str(model_dir), "--input", str(tmp_path / "a.png"), "--out",
               str(tmp_path / "o.safetensors"), "--adaptor", "dino"])
    assert rc == 2 and "available adaptors: ['sam']" in capsys.readouterr().err


@pytest.mark.parametrize("adaptor", [None, "sam"])
def test_pca_picture(tmp_path, model_dir, adaptor):
    _image(7, (50, 35)).save(tmp_path / "x.png")
    out = tmp_path / "pca.png"
    args = ["radio", "pca", "--model", str(model_dir), "--image", str(tmp_path / "x.png"), "--out", str(out),
            "--resolution", "32x64"]
    if adaptor:
        args += ["--adaptor", adaptor]
    assert main(args) == 0
    pic = np.asarray(Image.open(out))
    assert pic.shape == (32, 64, 3)
    enc = load(model_dir, adaptors=[adaptor] if adaptor else None)
    x = _to_tensor(Image.open(tmp_path / "x.png").convert("RGB"), (32, 64))[None]
    with torch.no_grad():
        r = enc(x)
    feats, grid = (r[adaptor].features[0], (4, 8)) if adaptor else (r.features[0], (2, 4))
    ref = np.asarray(Image.fromarray(pca_rgb(feats, grid)).resize((64, 32), Image.NEAREST))
    assert np.array_equal(pic, ref)
    assert main(args[:-2] + ["--side-by-side"] if not adaptor else args + ["--side-by-side"]) == 0


def test_pca_matches_numpy_svd():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(16, 3)))[0].T  # 3 orthonormal directions
    coef = rng.normal(size=(60, 3)) * np.array([5.0, 2.0, 0.5])
    feats = coef @ basis + 0.01 * rng.normal(size=(60, 16)) + 3.0
    proj, comps = pca_components(torch.tensor(feats, dtype=torch.float32))
    centred = feats - feats.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    ref = centred @ vt[:3].T
    for j in range(3):  # equal up to the fixed sign
        s = np.sign(ref[np.abs(ref[:, j]).argmax(), j])
        assert np.allclose(proj[:, j].numpy(), s * ref[:, j], atol=1e-3)
    rgb = pca_rgb(torch.tensor(feats, dtype=torch.float32), (6, 10))
    assert rgb.shape == (6, 10, 3) and rgb.dtype == np.uint8 and rgb.min() == 0 and rgb.max() == 255
    with pytest.raises(ValueError, match="grid 5x5"):
        pca_rgb(torch.zeros(60, 4), (5, 5))


def test_bench_script_tiny_smoke(tmp_path, capsys, load_script):
    mod = load_script("bench_radio")
    assert mod.main(["--tiny", "--device", "cpu", "--json", str(tmp_path / "b.json")]) == 0
    rows = json.loads((tmp_path / "b.json").read_text())
    assert [r["res"] for r in rows] == [64, 128]
    for r in rows:  # same weights -> same features as transformers.RadioModel
        assert r["variants"]["mmfm"]["diff"] < 1e-4 and r["variants"]["transformers"]["img_s"] > 0
    assert "| tiny | 64 |" in capsys.readouterr().out
