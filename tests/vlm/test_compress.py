"""Minitron pruning of Nemotron-H: slicing against exact references, group structure, KD loss math."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmfm.vlm.compress import (
    DistillConfig,
    Importance,
    PruneTarget,
    distill,
    estimate_importance,
    kd_loss,
    prune,
    select_mamba_heads,
)
from mmfm.vlm.decoder import tiny_nemotron_h


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = tiny_nemotron_h(vocab_size=48, hidden_size=32, pattern="M*-M-", mamba_heads=8, mamba_head_dim=8,
                        n_groups=2, num_heads=4, num_kv_heads=2, intermediate_size=64, state_size=8).eval()
    with torch.no_grad():  # random, non-trivial norm weights so channel slicing is visible
        for name, p in m.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.uniform_(0.5, 1.5)
    return m


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 48, (2, 24), generator=g) for _ in range(2)]


@pytest.fixture(scope="module")
def importance(model, batches):
    return estimate_importance(model, batches)


def test_importance_shapes(model, importance):
    assert importance.hidden.shape == (32,)
    assert set(importance.mamba_heads) == {0, 3} and importance.mamba_heads[0].shape == (8,)
    assert importance.mamba_channels[0].shape == (8,)
    assert importance.attention_heads[1].shape == (4,)
    assert set(importance.ffn) == {2, 4} and importance.ffn[2].shape == (64,)
    assert importance.layers.shape == (5,)


def test_noop_prune_is_exact(model, batches, importance):
    same = prune(model, importance, PruneTarget(hidden_size=32, ffn_intermediate=64, attention_heads=4,
                                                mamba_heads=8, mamba_head_dim=8))
    with torch.no_grad():
        torch.testing.assert_close(same(input_ids=batches[0]).logits, model(input_ids=batches[0]).logits,
                                   atol=1e-5, rtol=1e-5)


def test_ffn_and_attention_pruning_equal_zeroing_the_pruned_units(model, batches, importance):
    pruned = prune(model, importance, PruneTarget(ffn_intermediate=40, attention_heads=2))
    reference = tiny_nemotron_h(vocab_size=48, hidden_size=32, pattern="M*-M-", mamba_heads=8, mamba_head_dim=8,
                                n_groups=2, num_heads=4, num_kv_heads=2, intermediate_size=64, state_size=8).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for i in (2, 4):  # zero the dropped FFN neurons: relu^2(0) = 0 contributes nothing
            keep = importance.ffn[i].topk(40).indices
            drop = torch.ones(64, dtype=torch.bool)
            drop[keep] = False
            reference.model.layers[i].mixer.up_proj.weight[drop] = 0
        hd = reference.model.layers[1].mixer.head_dim
        scores = importance.attention_heads[1]
        for g in range(2):  # 2 query heads per KV head; keep the better one of each pair
            pair = scores[2 * g:2 * g + 2]
            dropped = 2 * g + int(pair.argmin())
            reference.model.layers[1].mixer.o_proj.weight[:, dropped * hd:(dropped + 1) * hd] = 0
        torch.testing.assert_close(pruned(input_ids=batches[0]).logits, reference(input_ids=batches[0]).logits,
                                   atol=1e-5, rtol=1e-5)
    assert pruned.config.num_attention_heads == 2 and pruned.config.intermediate_size == 40


def test_group_aware_head_selection_keeps_groups():
    scores = torch.tensor([9.0, 8.0, 7.0, 6.0, 1.0, 2.0, 3.0, 0.5])  # group 0 strong, group 1 weak
    aware = select_mamba_heads(scores, n_groups=2, keep=4, group_aware=True)
    naive = select_mamba_heads(scores, n_groups=2, keep=4, group_aware=False)
    assert aware.tolist() == [0, 1, 5, 6]
    assert naive.tolist() == [0, 1, 2, 3]  # all from group 0: heads 2, 3 would move to group 1's B/C
    with pytest.raises(ValueError, match="multiple of n_groups"):
        select_mamba_heads(scores, n_groups=2, keep=3)


def test_mamba_slicing_follows_the_in_proj_layout(model, importance):
    target = PruneTarget(mamba_heads=4, mamba_head_dim=6)
    pruned = prune(model, importance, target)
    src, dst = model.model.layers[0].mixer, pruned.model.layers[0].mixer
    heads = select_mamba_heads(importance.mamba_heads[0], 2, 4)
    ch = importance.mamba_channels[0].topk(6).indices.sort().values
    inner = (heads[:, None] * 8 + ch).reshape(-1)
    gn = 2 * 2 * 8  # B and C rows: 2 groups x state 8 each
    w, w2 = src.in_proj.weight, dst.in_proj.weight
    torch.testing.assert_close(w2[:24], w[inner])  # z
    torch.testing.assert_close(w2[24:48], w[64 + inner])  # x
    torch.testing.assert_close(w2[48:48 + gn], w[128:128 + gn])  # B, C untouched
    torch.testing.assert_close(w2[48 + gn:], w[128 + gn + heads])  # dt
    torch.testing.assert_close(dst.A_log, src.A_log[heads])
    torch.testing.assert_close(dst.out_proj.weight, src.out_proj.weight[:, inner])
    assert dst.n_groups == 2 and dst.norm.group_size == 12
    # every kept head stays in its group: old group = head // 4, new group = position // 2
    assert [int(h) // 4 for h in heads] == [i // 2 for i in range(4)]
    with torch.no_grad():
        assert torch.isfinite(pruned(input_ids=torch.randint(3, 48, (1, 9))).logits).all()


def test_hidden_and_depth_pruning_give_a_loadable_config(model, importance, tmp_path):
    from transformers import NemotronHForCausalLM

    pruned = prune(model, importance, PruneTarget(hidden_size=24, drop_layers=1))
    assert pruned.config.hidden_size == 24 and len(pruned.config.layers_block_type) == 4
    dropped = int(importance.layers.argmin())
    kept_types = [t for i, t in enumerate(model.config.layers_block_type) if i != dropped]
    assert pruned.config.layers_block_type == kept_types
    pruned.save_pretrained(tmp_path)
    again = NemotronHForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(3, 48, (1, 11))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, pruned(input_ids=ids).logits)


def test_depth_pruning_without_layer_scores_is_an_error(model):
    imp = Importance(hidden=torch.ones(32))
    with pytest.raises(ValueError, match="layer importance"):
        prune(model, imp, PruneTarget(drop_layers=1))


def test_kd_loss_is_forward_kl():
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    ref = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kd_loss(s, t, temperature=2.0), ref.mean() * 4)
    assert float(kd_loss(t, t)) == pytest.approx(0.0, abs=1e-6)


def test_distillation_reduces_kd_loss(model, importance, batches):
    student = prune(model, importance, PruneTarget(ffn_intermediate=32, mamba_heads=4))
    losses = distill(student, model, batches, DistillConfig(steps=30, lr=3e-3, warmup=3))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
