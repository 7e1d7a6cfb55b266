import math

import pytest
import torch

import attnbound

from attnbound.hardness import (
    GapHammingInstance,
    OVInstance,
    gap_hamming_instance,
    gap_hamming_to_attention,
    ov_instance,
    ov_to_attention,
    solve_gap_hamming,
    solve_ov,
    solve_via_attention,
)


def brute_ov_pairs(inst):
    return {(i, j) for i in range(inst.n) for j in range(inst.B.shape[0])
            if int((inst.A[i].int() * inst.B[j].int()).sum()) == 0}


@pytest.mark.parametrize("planted", [True, False])
def test_ov_instances_keep_their_promise(planted):
    for seed in range(15):
        inst = ov_instance(40, 10, planted=planted, seed=seed)
        pairs = brute_ov_pairs(inst)
        assert len(pairs) == (1 if planted else 0)
        ans, w = solve_ov(inst)
        assert ans == planted and (w in pairs if planted else w is None)


@pytest.mark.parametrize("kind", ["softmax", "l2"])
@pytest.mark.parametrize("planted", [True, False])
def test_ov_exact_oracle_agrees_with_brute_force_with_margin(kind, planted):
    for seed in range(12):
        inst = ov_instance(64, 12, planted=planted, seed=100 + seed)
        red = ov_to_attention(inst, kind=kind)
        dec = solve_via_attention(red, method="exact")
        ans, w = solve_ov(inst)
        assert dec.answer == ans and dec.certified
        out = attnbound.attention(red.q, red.k, red.v, scale=red.scale, kind=red.kind)
        margins = red.row_margins(out)
        hit_rows = {i for i, _ in brute_ov_pairs(inst)}
        for i in range(inst.n):
            if i in hit_rows:
                assert margins[i] <= -red.margin  # out ≤ 1/2
            else:
                assert margins[i] >= red.margin  # out ≥ 4/5
        if ans:
            assert dec.witness in hit_rows


@pytest.mark.parametrize("planted", [True, False])
def test_gap_hamming_exact_oracle_agrees(planted):
    for seed in range(10):
        inst = gap_hamming_instance(64, 48, t=6, gamma=0.5, planted=planted, seed=seed)
        ans, w = solve_gap_hamming(inst)
        assert ans == planted
        red = gap_hamming_to_attention(inst)
        dec = solve_via_attention(red)
        assert dec.answer == ans and dec.out_margin >= red.margin
        if ans:
            H = (inst.A[dec.witness].int() ^ inst.B.int()).sum(1)
            assert int(H.min()) <= inst.t


def test_gap_hamming_entry_bound_is_theta_sqrt_log_n():
    ratios = []
    for lg in range(6, 13):
        n = 1 << lg
        d = 8 * lg
        inst = gap_hamming_instance(n, d, t=d // 8, gamma=0.5, planted=True, seed=lg)
        red = gap_hamming_to_attention(inst)
        assert red.entry_bound == pytest.approx(float(red.q.abs().max()))
        ratios.append(red.meta["B_over_sqrt_ln_n"])
    assert max(ratios) / min(ratios) < 1.5 and 1.0 < min(ratios) < 5.0


def test_ov_entry_bound_grows_like_log_n():
    ratios = [ov_to_attention(ov_instance(1 << lg, 2 * lg, planted=False, seed=lg)).meta["B_over_ln_n"]
              for lg in range(4, 11)]
    assert max(ratios) / min(ratios) < 1.5


def test_approximate_oracle_flagged_uncertified_and_certified_one_decides():
    inst = ov_instance(4, 3, planted=True, seed=1)
    red = ov_to_attention(inst)
    truth, _ = solve_ov(inst)
    coarse = solve_via_attention(red, method="polynomial", degree=2)
    assert not coarse.certified and math.isinf(coarse.certificate.output_error_bound)
    fine = solve_via_attention(red, method="polynomial", degree=20)
    assert fine.certified and fine.certificate.output_error_bound < red.margin
    assert fine.answer == truth


def test_user_built_instances_and_errors():
    A = torch.tensor([[1, 0], [0, 1]])
    B = torch.tensor([[0, 1], [1, 1]])
    assert solve_ov(OVInstance(A, B)) == (True, (0, 0))
    with pytest.raises(ValueError, match="0/1"):
        OVInstance(A * 2, B)
    with pytest.raises(ValueError, match="same dimension"):
        OVInstance(A, torch.ones(2, 3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        OVInstance([[1]], B)
    with pytest.raises(ValueError, match="m must be >= 2"):
        ov_instance(4, 1, planted=True, seed=0)
    with pytest.raises(ValueError, match="n must be a positive int"):
        ov_instance(0, 4, planted=False)
    with pytest.raises(ValueError, match="gamma"):
        gap_hamming_instance(4, 16, t=2, gamma=0.0, planted=True)
    with pytest.raises(ValueError, match="t must be"):
        gap_hamming_instance(4, 16, t=16, gamma=0.5, planted=True)
    with pytest.raises(ValueError, match="promise"):
        GapHammingInstance(torch.zeros(1, 8, dtype=torch.uint8), torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0]]), 2, 1.0)
    with pytest.raises(TypeError):
        solve_via_attention("not a reduction")
