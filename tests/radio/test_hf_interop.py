"""HF `radio` interop: mmfm -> transformers.RadioModel and back give the same outputs (fp32 < 1e-4)."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
RadioConfig = transformers.RadioConfig
RadioModel = transformers.RadioModel

from mmfm.radio import RadioEncoder, create_student, export_hf, load  # noqa: E402
from mmfm.radio.adaptors import AdaptorSpec, MLPSpec, TeacherAdaptor  # noqa: E402

SHAPES = [
    # (student overrides, summary_idxs, input HxW)
    (dict(embed_dim=32, depth=2, num_heads=2, num_cls_tokens=1, num_registers=0), [0], (48, 80)),
    (dict(embed_dim=48, depth=3, num_heads=4, num_cls_tokens=3, num_registers=4), [0, 2], (64, 32)),
    (dict(embed_dim=64, depth=1, num_heads=8, num_cls_tokens=2, num_registers=1, patch_size=14,
          max_resolution=448, mlp_hidden_dim=172, qkv_bias=False), [1], (42, 70)),
    (dict(embed_dim=32, depth=2, num_heads=4, num_cls_tokens=4, num_registers=4, layer_scale_init=0.3), [0, 1, 3],
     (32, 32)),
]


def _perturb(model: torch.nn.Module, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _encoder(over, idxs):
    torch.manual_seed(0)
    enc = RadioEncoder(create_student("tiny", **over), summary_idxs=idxs,
                       input_mean=(0.5, 0.4, 0.3), input_std=(0.2, 0.25, 0.3)).eval()
    _perturb(enc.student)
    return enc


@pytest.mark.parametrize("over,idxs,hw", SHAPES)
def test_export_loads_in_transformers_with_same_outputs(tmp_path, over, idxs, hw):
    enc = _encoder(over, idxs)
    export_hf(enc, tmp_path)
    hf = RadioModel.from_pretrained(tmp_path).eval()
    x = torch.rand(2, 3, *hw)
    with torch.no_grad():
        ours, theirs = enc(x), hf(x)
    assert ours.summary.shape == theirs.summary.shape == (2, len(idxs) * over["embed_dim"])
    assert (ours.summary - theirs.summary).abs().max().item() < 1e-4
    assert (ours.features - theirs.features).abs().max().item() < 1e-4


@pytest.mark.parametrize("over,idxs,hw", SHAPES)
def test_transformers_checkpoint_loads_with_same_outputs(tmp_path, over, idxs, hw):
    p = over.get("patch_size", 16)
    cfg = RadioConfig(hidden_size=over["embed_dim"], num_hidden_layers=over["depth"],
                      num_attention_heads=over["num_heads"], patch_size=p,
                      max_img_size=over.get("max_resolution", 512), num_cls_tokens=over["num_cls_tokens"],
                      num_registers=over["num_registers"], summary_idxs=idxs,
                      mlp_ratio=over.get("mlp_hidden_dim", 2 * over["embed_dim"]) / over["embed_dim"],
                      qkv_bias=over.get("qkv_bias", True), norm_mean=[0.3, 0.5, 0.6], norm_std=[0.2, 0.3, 0.25])
    torch.manual_seed(1)
    hf = RadioModel(cfg).eval()
    _perturb(hf)
    hf.save_pretrained(tmp_path)
    enc = load(tmp_path)
    x = torch.rand(2, 3, *hw)
    with torch.no_grad():
        ours, theirs = enc(x), hf(x)
    assert (ours.summary - theirs.summary).abs().max().item() < 1e-4
    assert (ours.features - theirs.features).abs().max().item() < 1e-4


def test_bf16_outputs_agree(tmp_path):
    enc = _encoder(SHAPES[1][0], SHAPES[1][1])
    export_hf(enc, tmp_path)
    hf = RadioModel.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    x = torch.rand(2, 3, 64, 32)
    with torch.no_grad():
        ref = enc(x).features
        ours = enc.to(torch.bfloat16)(x.bfloat16()).features.float()
        theirs = hf(x.bfloat16()).features.float()
    scale = ref.abs().max().item()
    assert (ours - ref).abs().max().item() < 0.05 * scale
    assert (theirs - ref).abs().max().item() < 0.05 * scale
    assert (ours - theirs).abs().max().item() < 0.05 * scale


def test_in_memory_names_are_read(tmp_path):
    """A safetensors file with RadioModel's in-memory names (q/k/v_proj, embeddings.*) also loads."""
    from safetensors.torch import save_file

    cfg = RadioConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, max_img_size=256,
                      num_cls_tokens=2, num_registers=1, summary_idxs=[0, 1])
    torch.manual_seed(3)
    hf = RadioModel(cfg).eval()
    _perturb(hf)
    cfg.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "model.safetensors"))
    x = torch.rand(1, 3, 32, 64)
    with torch.no_grad():
        assert torch.allclose(load(tmp_path)(x).features, hf(x).features, atol=1e-4)


def test_adaptors_travel_beside_the_hf_files(tmp_path):
    enc = _encoder(SHAPES[1][0], SHAPES[1][1])
    ad = TeacherAdaptor(AdaptorSpec(head_idx=2, upsample_factor=2), MLPSpec(48, 40, 24, 1), MLPSpec(48, 40, 16, 2))
    enc.adaptors["clip"] = ad
    export_hf(enc, tmp_path)
    assert json.loads((tmp_path / "mmfm_adaptors.json").read_text())["clip"]["head_idx"] == 2
    RadioModel.from_pretrained(tmp_path)  # transformers ignores the side files
    back = load(tmp_path, adaptors=["clip"])
    x = torch.rand(1, 3, 32, 64)
    with torch.no_grad():
        a, b = enc(x), back(x)
    assert torch.allclose(a["clip"].features, b["clip"].features, atol=1e-5)
    assert torch.allclose(a["clip"].summary, b["clip"].summary, atol=1e-5)


def test_inexpressible_models_are_refused(tmp_path):
    win = RadioEncoder(create_student("tiny", depth=4, window_size=2, global_blocks=(3,)))
    with pytest.raises(ValueError, match="windowed attention"):
        export_hf(win, tmp_path)
    with pytest.raises(ValueError, match="final LayerNorm"):
        export_hf(RadioEncoder(create_student("tiny", final_norm=True)), tmp_path)
    cfg = RadioConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, max_img_size=256,
                      use_swiglu_ffn=True)
    RadioModel(cfg).save_pretrained(tmp_path / "swiglu")
    with pytest.raises(ValueError, match="SwiGLU"):
        load(tmp_path / "swiglu")


def test_sharded_transformers_checkpoint(tmp_path):
    cfg = RadioConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, max_img_size=256,
                      num_cls_tokens=2, num_registers=2, summary_idxs=[1])
    torch.manual_seed(5)
    hf = RadioModel(cfg).eval()
    _perturb(hf)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    x = torch.rand(1, 3, 48, 32)
    with torch.no_grad():
        ours, theirs = load(tmp_path)(x), hf(x)
    assert (ours.features - theirs.features).abs().max().item() < 1e-4
    assert (ours.summary - theirs.summary).abs().max().item() < 1e-4
