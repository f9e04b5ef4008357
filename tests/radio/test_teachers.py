"""Teacher wrappers: tiny random-init models of every family, checked against the libraries' own forwards."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mmfm.radio.teachers import TeacherSpec, build_teacher

TINY_HF = {
    "siglip": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=8),
    "siglip2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=8),
    "dinov2": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=8),
    "dinov2_registers": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=8,
                             num_register_tokens=2),
    "sam": dict(hidden_size=32, output_channels=16, num_hidden_layers=1, num_attention_heads=2, patch_size=8,
                window_size=2, global_attn_indexes=[0], mlp_dim=64),
    "radio": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=8, num_cls_tokens=2,
                  num_registers=1, max_img_size=64),
}


def _images(b=2, s=40, seed=0):
    return torch.rand(b, 3, s, s, generator=torch.Generator().manual_seed(seed))


def _prep(t, images):
    x = F.interpolate(images, size=(t.input_size, t.input_size), mode="bilinear", align_corners=False, antialias=True)
    return (x - t.mean) / t.std


def test_timm_vit_matches_forward_and_is_frozen():
    spec = TeacherSpec("vit", "timm", "vit_tiny_patch16_224", input_size=64)
    t = build_teacher(spec)
    imgs = _images()
    s, f = t(imgs)
    assert s.shape == (2, 192) and f.shape == (2, 192, 4, 4) and t.patch_size == 16
    x = _prep(t, imgs)
    ref_tokens = t.model.forward_features(x)
    torch.testing.assert_close(f.flatten(2).transpose(1, 2), ref_tokens[:, 1:])
    torch.testing.assert_close(s, t.model.forward_head(ref_tokens, pre_logits=True))
    t.train()
    assert not t.training and not t.model.training
    assert all(not p.requires_grad for p in t.parameters())
    assert not s.requires_grad


def test_timm_dinov2_registers_and_sam():
    t = build_teacher(TeacherSpec("dino", "timm", "vit_small_patch14_reg4_dinov2", input_size=56,
                                  model_kwargs=dict(embed_dim=32, depth=1, num_heads=2)))
    s, f = t(_images())
    assert f.shape == (2, 32, 4, 4) and s.shape == (2, 32) and t.model.num_prefix_tokens == 5
    x = _prep(t, _images())
    torch.testing.assert_close(s, t.model.forward_features(x)[:, 0])  # token pool = CLS after norm
    t = build_teacher(TeacherSpec("sam", "timm", "samvit_base_patch16", input_size=64, use_summary=False,
                                  model_kwargs=dict(embed_dim=32, depth=1, num_heads=2, global_attn_indexes=(0,),
                                                    neck_chans=16, window_size=2)))
    s, f = t(_images())
    assert f.shape == (2, 16, 4, 4)
    torch.testing.assert_close(s, f.mean(dim=(2, 3)))


def test_open_clip_from_config_matches_encode_image():
    import open_clip

    cfg = dict(embed_dim=24, vision_cfg=dict(layers=1, width=32, head_width=16, patch_size=8))
    t = build_teacher(TeacherSpec("clip", "open_clip", input_size=32, model_kwargs=cfg))
    imgs = _images()
    s, f = t(imgs)
    assert s.shape == (2, 24) and f.shape == (2, 32, 4, 4) and t.patch_size == 8
    x = _prep(t, imgs)
    torch.testing.assert_close(s, t.model(x))  # the tower's own pooled + projected output
    torch.testing.assert_close(t.mean.flatten(), torch.tensor(open_clip.OPENAI_DATASET_MEAN))
    # tokens: ln_post of the last block's patch tokens
    t.model.output_tokens = True
    _, tokens = t.model(x)
    t.model.output_tokens = False
    torch.testing.assert_close(f.flatten(2).transpose(1, 2), tokens)


def test_open_clip_checkpoint_roundtrip(tmp_path):
    cfg = dict(embed_dim=24, vision_cfg=dict(layers=1, width=32, head_width=16, patch_size=8))
    torch.manual_seed(0)
    a = build_teacher(TeacherSpec("clip", "open_clip", input_size=32, model_kwargs=cfg))
    path = tmp_path / "clip.safetensors"
    save_file({f"visual.{k}": v.contiguous() for k, v in a.model.state_dict().items()}, str(path))
    torch.manual_seed(1)
    b = build_teacher(TeacherSpec("clip", "open_clip", input_size=32, model_kwargs=cfg, checkpoint=str(path),
                                  pretrained=True))
    imgs = _images()
    torch.testing.assert_close(a(imgs)[1], b(imgs)[1])


@pytest.mark.parametrize("kind", sorted(TINY_HF))
def test_transformers_teachers(kind):
    spec = TeacherSpec(kind, "transformers", kind, input_size=32, model_kwargs=TINY_HF[kind])
    t = build_teacher(spec)
    imgs = _images()
    s, f = t(imgs)
    c = 16 if kind == "sam" else 32
    assert f.shape == (2, c, 4, 4), f.shape
    assert s.ndim == 2 and s.shape[0] == 2 and torch.isfinite(s).all()
    x = _prep(t, imgs)
    if kind == "dinov2":
        out = t.model(pixel_values=x)
        torch.testing.assert_close(s, out.pooler_output)
        torch.testing.assert_close(f.flatten(2).transpose(1, 2), out.last_hidden_state[:, 1:])
    if kind == "radio":
        out = t.model(pixel_values=F.interpolate(imgs, size=(32, 32), mode="bilinear", antialias=True))
        torch.testing.assert_close(s, out.summary)
        torch.testing.assert_close(f.flatten(2).transpose(1, 2), out.features)
    if kind == "siglip":
        out = t.model(pixel_values=x)
        torch.testing.assert_close(s, out.pooler_output)


def test_transformers_from_pretrained_dir(tmp_path):
    spec = TeacherSpec("dino", "transformers", "dinov2", input_size=32, model_kwargs=TINY_HF["dinov2"])
    a = build_teacher(spec)
    a.model.save_pretrained(tmp_path / "dino")
    b = build_teacher(TeacherSpec("dino", "transformers", "dinov2", input_size=32, checkpoint=str(tmp_path / "dino")))
    imgs = _images()
    torch.testing.assert_close(a(imgs)[1], b(imgs)[1])


def test_errors(tmp_path):
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        build_teacher(TeacherSpec("x", "timm", "vit_tiny_patch16_224", input_size=64, checkpoint=missing))
    with pytest.raises(ValueError, match="pretrained=True"):
        TeacherSpec("x", "timm", "vit_tiny_patch16_224", pretrained=True)
    with pytest.raises(ValueError, match="family"):
        TeacherSpec("x", "keras", "m")
    with pytest.raises(ValueError, match="model_name must be one of"):
        build_teacher(TeacherSpec("x", "transformers", "resnet"))
    t = build_teacher(TeacherSpec("vit", "timm", "vit_tiny_patch16_224", input_size=64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        t(torch.rand(3, 64, 64))


def test_toy_teacher_fixed_and_student_resolution():
    torch.manual_seed(0)
    fixed = build_teacher(TeacherSpec("a", "toy", width=24, depth=1, patch_size=16, input_size=32))
    s, f = fixed(_images(s=50))
    assert s.shape == (2, 24) and f.shape == (2, 24, 2, 2)
    torch.testing.assert_close(s, fixed.model.forward_features(_prep(fixed, _images(s=50)))[:, 0])
    dyn = build_teacher(TeacherSpec("b", "toy", width=16, depth=1, patch_size=8, input_size=0))
    assert dyn.spec.match_student_resolution
    _, f = dyn(torch.rand(1, 3, 48, 40))
    assert f.shape == (1, 16, 6, 5)  # runs at the given size
    _, f = dyn(torch.rand(1, 3, 50, 41))  # snapped down to multiples of the patch size
    assert f.shape == (1, 16, 6, 5)
    with pytest.raises(ValueError, match="width, depth and patch_size"):
        build_teacher(TeacherSpec("c", "toy", width=16, input_size=32))


@pytest.mark.gpu
def test_bf16_autocast_on_gpu_close_to_fp32():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    t = build_teacher(TeacherSpec("vit", "timm", "vit_tiny_patch16_224", input_size=64)).cuda()
    imgs = _images().cuda()
    s16, f16 = t(imgs)
    x = _prep(t, imgs)
    with torch.no_grad():
        ref = t.model.forward_features(x)  # fp32, no autocast
    assert f16.dtype == torch.float32
    torch.testing.assert_close(f16.flatten(2).transpose(1, 2), ref[:, 1:], rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("family,name,kw", [
    ("timm", "vit_small_patch14_dinov2", dict(model_kwargs=dict(depth=2, embed_dim=48, num_heads=2))),
    ("timm", "samvit_base_patch16", dict(model_kwargs=dict(depth=2, embed_dim=32, num_heads=2, window_size=2,
                                                           global_attn_indexes=[1], neck_chans=16))),
])
def test_bf16_weights_run_natively_close_to_fp32(family, name, kw):
    # bf16 weights: the teacher runs in bf16 without autocast (its fp32 LayerNorm outputs and re-casts cost
    # time); the fp32 teacher is the reference, at bf16 tolerance (the residual stream is bf16 either way)
    torch.manual_seed(0)
    t = build_teacher(TeacherSpec("t", family, name, input_size=56 if "dino" in name else 64, **kw))
    assert t.low_precision_weights() is None
    imgs = _images(s=60)
    s32, f32 = t(imgs)
    t.model.to(torch.bfloat16)
    assert t.low_precision_weights() == torch.bfloat16
    s16, f16 = t(imgs)
    assert f16.dtype == torch.float32 and f16.shape == f32.shape
    for got, want in ((s16, s32), (f16, f32)):
        rel = (got - want).norm() / want.norm()
        assert rel < 2e-2, f"{name}: bf16 relative error {rel:.3g}"
        assert torch.nn.functional.cosine_similarity(got.flatten(1), want.flatten(1)).min() > 0.999


def _check_sam_attention_matches_timm(dtype: torch.dtype, tol: float, device: str, embed_dim: int,
                                      img: int) -> None:
    import timm

    from mmfm.radio.teachers import _sam_attention_in_4d, _sam_contiguous_tokens

    kw = dict(pretrained=False, num_classes=0, img_size=img, embed_dim=embed_dim, depth=2, num_heads=2,
              global_attn_indexes=[1], window_size=3, neck_chans=16)
    torch.manual_seed(0)
    ref = timm.create_model("samvit_base_patch16", **kw).eval().to(device, dtype)
    for blk in ref.blocks:  # random rel-pos tables: the default zeros would hide a wrong bias
        torch.nn.init.normal_(blk.attn.rel_pos_h, std=0.5)
        torch.nn.init.normal_(blk.attn.rel_pos_w, std=0.5)
    ours = timm.create_model("samvit_base_patch16", **kw).eval().to(device, dtype)
    ours.load_state_dict(ref.state_dict())
    assert _sam_attention_in_4d(ours) == 2 and _sam_attention_in_4d(timm.create_model("vit_tiny_patch16_224")) == 0
    assert _sam_contiguous_tokens(ours) and not _sam_contiguous_tokens(timm.create_model("vit_tiny_patch16_224"))
    block_inputs = []
    for blk in ours.blocks:
        blk.register_forward_pre_hook(lambda m, args: block_inputs.append(args[0].is_contiguous()))
    x = torch.randn(2, 3, img, img, dtype=dtype, device=device)
    with torch.no_grad():
        want, got = ref.forward_features(x).float(), ours.forward_features(x).float()
    torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=tol)
    assert block_inputs == [True, True]  # timm's own grid is channels-first in memory (the reason for the hook)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("embed_dim", [32, 40])  # head width 16 and 20 (sqrt(20) is not a bf16 number)
def test_sam_attention_in_4d_matches_timm(dtype, tol, embed_dim):
    # the SAM teacher's attention runs one SDPA call on (B, heads, N, C) with the rel-pos bias folded into
    # q and k; timm's own forward (dense bias, (B * heads, N, C)) is the reference, windowed and global blocks
    _check_sam_attention_matches_timm(dtype, tol, "cpu", embed_dim, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 3e-2)])
def test_sam_attention_in_4d_matches_timm_on_gpu(dtype, tol):
    # on a GPU SDPA takes the fused kernels (flash / cuDNN / memory-efficient) for the widened q, k, v;
    # fp32 tolerance allows for TF32-free but reordered fused accumulation. 128 px: 8 x 8 global grid
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _check_sam_attention_matches_timm(dtype, tol, "cuda", 128, 128)


def _check_open_clip_packed_attention(dtype: torch.dtype, tol: float, device: str) -> None:
    import open_clip

    from mmfm.radio.teachers import _open_clip_packed_attention

    cfg = dict(embed_dim=24, vision_cfg=dict(layers=2, width=64, head_width=16, patch_size=8, image_size=32))
    torch.manual_seed(0)
    ref = open_clip.model.CLIP(cfg["embed_dim"], cfg["vision_cfg"], dict(context_length=8, vocab_size=16, width=8,
                                                                         heads=1, layers=1)).visual
    ref = ref.eval().to(device, dtype)
    torch.manual_seed(1)
    t = build_teacher(TeacherSpec("clip", "open_clip", input_size=32, model_kwargs=cfg))
    t.model.load_state_dict(ref.state_dict())
    t.model.to(device, dtype)
    patched = [b for b in t.model.modules() if "attention" in vars(b)]
    assert len(patched) == 2 and not any("attention" in vars(b) for b in ref.modules())
    assert _open_clip_packed_attention(torch.nn.Linear(2, 2)) == 0
    x = torch.randn(3, 3, 32, 32, device=device, dtype=dtype)
    with torch.no_grad():
        want = ref.forward_intermediates(x, indices=1, output_fmt="NCHW")["image_intermediates"][-1].float()
        got = t.model.forward_intermediates(x, indices=1, output_fmt="NCHW")["image_intermediates"][-1].float()
        torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=tol)
        # a masked call is not self-attention without a mask: open_clip's own method answers it
        blk, tokens = patched[0], torch.randn(3, 5, 64, device=device, dtype=dtype)
        mask = torch.zeros(5, 5, device=device, dtype=dtype).masked_fill(torch.ones(5, 5, dtype=torch.bool,
                                                                                    device=device).triu(1), -1e4)
        ref_blk = ref.transformer.resblocks[0]
        torch.testing.assert_close(blk.attention(tokens, attn_mask=mask), ref_blk.attention(tokens, attn_mask=mask))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_open_clip_packed_attention_matches_multihead_attention(dtype, tol):
    # the CLIP teacher's blocks run one packed qkv projection and one SDPA call; open_clip's own tower
    # (nn.MultiheadAttention) with the same weights is the reference
    _check_open_clip_packed_attention(dtype, tol, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 3e-2)])
def test_open_clip_packed_attention_matches_multihead_attention_on_gpu(dtype, tol):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _check_open_clip_packed_attention(dtype, tol, "cuda")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("family,name,kw", [
    ("open_clip", "", dict(model_kwargs=dict(embed_dim=24, vision_cfg=dict(layers=2, width=64, head_width=16,
                                                                           patch_size=8)))),
    ("timm", "vit_small_patch14_dinov2", dict(model_kwargs=dict(depth=2, embed_dim=48, num_heads=2))),
    ("timm", "samvit_base_patch16", dict(model_kwargs=dict(depth=2, embed_dim=32, num_heads=2, window_size=2,
                                                           global_attn_indexes=[1], neck_chans=16))),
])
def test_gelu_epilogue_teacher_close_to_exact_gelu(family, name, kw, dtype, tol):
    # gelu_epilogue fuses each MLP's fc1 + GELU (tanh approximation); the unfused teacher (exact GELU) with the
    # same weights is the reference. Weights (and LayerScales) are scaled up so the MLPs' pre-activations
    # reach the range where the two GELUs differ most (|x| ~ 1-3) and the MLPs reach the output
    from mmfm.kernels.linear_gelu import LinearGELU

    spec = TeacherSpec("t", family, name, input_size=56 if "dino" in name else 64, **kw)
    torch.manual_seed(0)
    ref = build_teacher(spec)
    with torch.no_grad():
        for m in ref.model.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, std=1.5 * m.in_features**-0.5)
            if isinstance(getattr(m, "gamma", None), torch.nn.Parameter):  # DINOv2's LayerScale starts at 1e-5
                m.gamma.fill_(1.0)
    fused = build_teacher(TeacherSpec(**{**vars(spec), "gelu_epilogue": True}))
    fused.model.load_state_dict(ref.model.state_dict())  # same keys: the fused Linear keeps its names
    assert sum(isinstance(m, LinearGELU) for m in fused.modules()) == 2
    assert not any(isinstance(m, torch.nn.GELU) for m in fused.model.modules())
    ref.model.to(dtype)
    fused.model.to(dtype)
    imgs = _images(s=60)
    for got, want in zip(fused(imgs), ref(imgs)):
        rel = (got - want).norm() / want.norm()
        assert 0 < rel < tol, f"{family} {name}: relative difference {rel:.3g}"


def test_gelu_epilogue_needs_a_gelu_mlp():
    spec = TeacherSpec("h", "transformers", "dinov2", input_size=32, gelu_epilogue=True, model_kwargs=TINY_HF["dinov2"])
    with pytest.raises(ValueError, match="gelu_epilogue"):
        build_teacher(spec)
