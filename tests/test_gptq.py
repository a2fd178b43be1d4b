"""Batched GPTQ against a textbook, one-column-at-a-time GPTQ written plainly here."""

import pytest
import torch

from qmoe.gptq import compensated_target, gptq_quantize
from qmoe.quant import make_grid, quantize_rtn


def _problem(E=3, rows=24, cols=40, tokens=300, seed=0, dtype=torch.float32):
    """Weights and Hessians 2 X^T X / n from correlated inputs (a shared random mixing matrix)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 0.6 * torch.randn(cols, cols, generator=g) / cols**0.5
    x = torch.randn(E, tokens, cols, generator=g) @ mix  # [E, tokens, cols]
    x = x * (0.2 + torch.rand(E, 1, cols, generator=g))  # uneven feature scales
    H = 2 * x.transpose(1, 2) @ x / tokens  # [E, cols, cols]
    w = torch.randn(E, rows, cols, generator=g).to(dtype)
    return w, H


def _plain_round(w_col, grid, e, col):
    """Rounds one column ``[rows]`` of expert ``e`` to its grid, written out per element."""
    g = None if grid.group_size is None else col // grid.group_size
    out = []
    for r, x in enumerate(w_col.tolist()):
        if grid.kind == "ternary":
            a = float(grid.lo[e, r] if g is None else grid.lo[e, r, g])
            b = float(grid.hi[e, r] if g is None else grid.hi[e, r, g])
            out.append(b if x > b / 2 and b > 0 else (a if x < a / 2 and a < 0 else 0.0))
        else:
            s = float(grid.scale[e, r] if g is None else grid.scale[e, r, g])
            z = float(grid.zero[e, r] if g is None else grid.zero[e, r, g])
            c = min(max(round(x / s) + z, 0), grid.maxq)
            out.append(s * (c - z))
    return torch.tensor(out, dtype=torch.float64)


def _textbook_gptq(w, H, grid, e, damp, act_order):
    """Classic GPTQ for one expert in float64: no blocks, no batching, one column at a time."""
    W = w.double().clone()  # [rows, cols]
    H = H.double().clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    live_mean = torch.diag(H)[~dead].mean()
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    order = list(range(cols))
    if act_order:
        order = sorted(order, key=lambda i: -float(H[i, i]))  # stable: ties keep index order
    W, H = W[:, order], H[order][:, order]
    H += damp * live_mean * torch.eye(cols, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)  # H^-1 = U^T U
    Q = torch.zeros_like(W)
    for i in range(cols):
        Q[:, i] = _plain_round(W[:, i], grid, e, order[i])
        err = (W[:, i] - Q[:, i]) / U[i, i]
        W[:, i + 1 :] -= torch.outer(err, U[i, i + 1 :])
    out = torch.zeros_like(Q)
    out[:, order] = Q
    return out


def _loss(w, q, H):
    d = (w.double() - q.double())  # [E, rows, cols]
    return ((d @ H.double()) * d).sum(dim=(1, 2))


@pytest.mark.parametrize(
    "bits, act_order, group_size",
    [("ternary", False, None), ("ternary", True, None), (4, False, None), (4, True, None), (3, True, 8)],
)
def test_matches_textbook_gptq(bits, act_order, group_size):
    w, H = _problem(seed=1)
    H[1, 5, :] = 0.0  # a dead input column in expert 1
    H[1, :, 5] = 0.0
    res = gptq_quantize(w, H, bits=bits, act_order=act_order, group_size=group_size, block_size=16)
    damp = 0.1 if bits == "ternary" else 0.01
    expect_grid = make_grid(w, bits, hessian_diag=torch.diagonal(H, dim1=1, dim2=2), group_size=group_size)
    assert torch.equal(quantize_rtn(w, expect_grid), quantize_rtn(w, res.grid))
    for e in range(w.shape[0]):
        ref = _textbook_gptq(w[e], H[e], res.grid, e, damp, act_order)
        # float32 blocked vs float64 column-by-column: a weight within rounding distance of a
        # threshold may round the other way; everything else is identical.
        mismatch = (~torch.isclose(res.qweight[e].double(), ref, rtol=1e-5, atol=1e-7)).float().mean().item()
        assert mismatch < 0.002, f"expert {e}: {mismatch:.2%} of values differ from textbook GPTQ"
        ref_loss = _loss(w[e : e + 1], ref[None], H[e : e + 1]).item()
        assert res.loss[e].item() == pytest.approx(ref_loss, rel=2e-3)
    assert not res.fallback.any() and res.reason == [None] * 3
    assert (res.qweight[1, :, 5] == 0).all()  # dead column zeroed


@pytest.mark.parametrize("act_order", [False, True])
def test_batched_equals_one_expert_at_a_time(act_order):
    w, H = _problem(E=4, seed=2)
    res = gptq_quantize(w, H, act_order=act_order, block_size=8)
    for e in range(4):
        one = gptq_quantize(w[e : e + 1], H[e : e + 1], act_order=act_order, block_size=8)
        assert torch.equal(one.qweight[0], res.qweight[e])
        assert torch.equal(one.codes[0], res.codes[e])
        assert one.loss[0].item() == pytest.approx(res.loss[e].item(), rel=1e-5)


def test_block_size_does_not_change_the_result():
    w, H = _problem(seed=3)
    a = gptq_quantize(w, H, bits=4, block_size=7)
    b = gptq_quantize(w, H, bits=4, block_size=1000)
    assert (a.qweight != b.qweight).float().mean() < 0.002
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-3, atol=0)


@pytest.mark.parametrize("bits, grid_kind", [("ternary", "minmax"), ("ternary", "optimized"), (2, "minmax"), (4, "minmax")])
def test_gptq_beats_rtn_and_reports_the_true_loss(bits, grid_kind):
    w, H = _problem(E=2, rows=32, cols=64, seed=4)
    res = gptq_quantize(w, H, bits=bits, ternary_grid=grid_kind)
    rtn = quantize_rtn(w, res.grid)
    torch.testing.assert_close(res.loss.double(), _loss(w, res.qweight, H), rtol=1e-4, atol=0)
    assert (res.loss.double() < 0.95 * _loss(w, rtn, H)).all()


def test_optimized_grid_helps_gptq_on_the_same_problem():
    w, H = _problem(E=3, rows=32, cols=64, seed=5)
    opt = gptq_quantize(w, H, ternary_grid="optimized")
    mm = gptq_quantize(w, H, ternary_grid="minmax")
    assert (opt.loss < mm.loss).all()


@pytest.mark.parametrize("bits", ["ternary", 4])
def test_outputs_lie_on_the_grid(bits):
    w, H = _problem(seed=6)
    res = gptq_quantize(w, H, bits=bits, group_size=16 if bits == 4 else None)
    assert res.qweight.dtype == torch.float32
    assert torch.equal(res.grid.dequantize(res.codes), res.qweight)
    assert torch.equal(quantize_rtn(res.qweight, res.grid), res.qweight)
    if bits == "ternary":
        assert res.codes.dtype == torch.int8
        lo, hi = res.grid.lo[..., None], res.grid.hi[..., None]
        assert ((res.qweight == lo) | (res.qweight == hi) | (res.qweight == 0)).all()
    else:
        assert res.codes.dtype == torch.uint8 and int(res.codes.max()) <= 15


def test_fallback_experts_use_rtn_and_leave_the_others_alone():
    w, H = _problem(E=4, seed=7)
    H_bad = H.clone()
    H_bad[1] = 0.0  # no tokens
    H_bad[3] = torch.eye(H.shape[1])
    H_bad[3, 0, 1] = H_bad[3, 1, 0] = 5.0  # indefinite: eigenvalue -4 survives 10% dampening
    res = gptq_quantize(w, H_bad, names=[f"enc.0.expert_{e}" for e in range(4)])
    assert res.fallback.tolist() == [False, True, False, True]
    assert "no tokens" in res.reason[1] and "positive definite" in res.reason[3]
    assert res.reason[0] is None and res.reason[2] is None
    rtn = quantize_rtn(w, res.grid)
    assert torch.equal(res.qweight[1], rtn[1]) and torch.equal(res.qweight[3], rtn[3])
    assert res.loss[1].item() == 0.0
    assert res.loss[3].item() == pytest.approx(_loss(w[3:4], rtn[3:4], H_bad[3:4]).item(), rel=1e-5)
    good = gptq_quantize(w[[0, 2]], H[[0, 2]])
    assert torch.equal(res.qweight[[0, 2]], good.qweight)
    assert torch.isfinite(res.loss).all()


@pytest.mark.parametrize("where", ["weights", "Hessian"])
def test_non_finite_input_names_the_expert(where):
    w, H = _problem(E=3, seed=8)
    if where == "weights":
        w[2, 4, 7] = float("nan")
    else:
        H[2, 3, 3] = float("inf")
    with pytest.raises(ValueError, match=f"{where} of layer9.expert_2 contains NaN or Inf"):
        gptq_quantize(w, H, names=[f"layer9.expert_{e}" for e in range(3)])


def test_deterministic_and_input_untouched():
    w, H = _problem(seed=9)
    w0, H0 = w.clone(), H.clone()
    a = gptq_quantize(w, H, act_order=True)
    b = gptq_quantize(w, H, act_order=True)
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.loss, b.loss)
    assert torch.equal(w, w0) and torch.equal(H, H0)


def test_bfloat16_weights_are_quantized_in_float32():
    w, H = _problem(seed=10, dtype=torch.bfloat16)
    res = gptq_quantize(w, H, bits=4)
    assert res.qweight.dtype == torch.float32
    assert torch.equal(res.qweight, gptq_quantize(w.float(), H, bits=4).qweight)


def test_bad_arguments_raise():
    w, H = _problem(E=2, seed=11)
    with pytest.raises(ValueError, match="H must be"):
        gptq_quantize(w, H[:, :-1, :-1])
    with pytest.raises(ValueError, match="names"):
        gptq_quantize(w, H, names=["a"])
    with pytest.raises(ValueError, match="block_size"):
        gptq_quantize(w, H, block_size=0)
    with pytest.raises(ValueError, match="damp"):
        gptq_quantize(w, H, damp=-0.1)
    with pytest.raises(ValueError, match="bits"):
        gptq_quantize(w, H, bits=8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    w, H = _problem(seed=12)
    cpu = gptq_quantize(w, H, act_order=True)
    gpu = gptq_quantize(w.cuda(), H.cuda(), act_order=True)
    assert (gpu.qweight.cpu() != cpu.qweight).float().mean() < 0.005
    torch.testing.assert_close(gpu.loss.cpu(), cpu.loss, rtol=2e-3, atol=0)


# -- compensated targets -------------------------------------------------------------------------

def _drifted(E=3, rows=16, cols=24, tokens=400, noise=0.3, seed=7):
    """Original inputs X_ref and the same tokens' inputs X after upstream quantization error."""
    g = torch.Generator().manual_seed(seed)
    x_ref = torch.randn(E, tokens, cols, generator=g) * (0.3 + torch.rand(E, 1, cols, generator=g))
    x = x_ref + noise * torch.randn(E, tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g) / cols**0.5
    w = torch.randn(E, rows, cols, generator=g)
    H = 2 * x.transpose(1, 2) @ x / tokens
    C = 2 * x.transpose(1, 2) @ x_ref / tokens
    return w, x, x_ref, H, C


def test_compensated_target_is_the_least_squares_solution():
    w, x, x_ref, H, C = _drifted()
    target = compensated_target(w, H, C, damp=0.0)
    # Independent reference: solve min ||X T^T - X_ref W^T|| with a QR-based least-squares solver.
    ref = torch.linalg.lstsq(x.double(), (x_ref @ w.transpose(1, 2)).double()).solution.transpose(1, 2)
    torch.testing.assert_close(target.double(), ref, rtol=1e-4, atol=1e-4)
    # With dampening it is the ridge solution: lam ||T||^2 added to the objective.
    lam = 0.05 * torch.diagonal(H, dim1=1, dim2=2).mean(dim=1)
    root_lam = lam.double().sqrt()[:, None, None]
    a = torch.cat([x.double() * (2 / x.shape[1]) ** 0.5, root_lam * torch.eye(24)[None]], 1)
    b = torch.cat([(x_ref @ w.transpose(1, 2)).double() * (2 / x.shape[1]) ** 0.5,
                   torch.zeros(3, 24, 16, dtype=torch.float64)], 1)
    ridge = torch.linalg.lstsq(a, b).solution.transpose(1, 2)
    torch.testing.assert_close(compensated_target(w, H, C, damp=0.05).double(), ridge, rtol=1e-4, atol=1e-4)


def test_compensated_target_without_drift_is_the_original_shrunk_by_the_dampening():
    w, x, _, H, _ = _drifted()
    torch.testing.assert_close(compensated_target(w, H, H, damp=0.0), w, rtol=1e-4, atol=1e-4)
    # With lam > 0: W H (H + lam I)^-1, each eigendirection of H scaled by s / (s + lam).
    lam = 0.3 * torch.diagonal(H, dim1=1, dim2=2).mean(dim=1)
    s, V = torch.linalg.eigh(H.double())
    shrink = V @ torch.diag_embed(s / (s + lam.double()[:, None])) @ V.transpose(1, 2)
    torch.testing.assert_close(compensated_target(w, H, H, damp=0.3).double(), w.double() @ shrink,
                               rtol=1e-4, atol=1e-4)
    assert (compensated_target(w, H, H, damp=0.3).norm(dim=(1, 2)) < w.norm(dim=(1, 2))).all()


def test_anchored_experts_keep_what_the_calibration_never_reached():
    # 10 tokens for 24 columns: H has a 14-dimensional null space.
    w, x, x_ref, H, C = _drifted(tokens=10)
    anchored = torch.tensor([True, False, True])
    target = compensated_target(w, H, C, anchored=anchored)
    _, V = torch.linalg.eigh(H.double())
    null = V[:, :, :14]  # eigenvectors of the 14 zero eigenvalues
    unseen = lambda t: t.double() @ null  # noqa: E731  the weights' component in each null space
    torch.testing.assert_close(unseen(target)[anchored], unseen(w)[anchored], rtol=1e-4, atol=1e-4)
    assert unseen(w)[1].abs().max() > 0.1
    assert unseen(target)[1].abs().max() < 1e-3  # not anchored: shrunk to zero there
    # Anchored and without drift, the original weights come back exactly.
    torch.testing.assert_close(compensated_target(w, H, H, damp=0.3, anchored=torch.ones(3, dtype=torch.bool)), w,
                               rtol=1e-4, atol=1e-4)


def test_compensation_lowers_the_error_against_the_original_output():
    w, x, x_ref, H, C = _drifted(rows=32, cols=48, tokens=800)
    y_ref = x_ref @ w.transpose(1, 2)
    plain = gptq_quantize(w, H, ternary_grid="minmax")
    comp = gptq_quantize(compensated_target(w, H, C), H, ternary_grid="minmax")
    err = lambda q: (y_ref - x @ q.transpose(1, 2)).square().sum(dim=(1, 2))  # noqa: E731
    assert (err(comp.qweight) < 0.9 * err(plain.qweight)).all()


def test_compensated_target_dead_columns_and_empty_experts():
    w, x, x_ref, H, C = _drifted()
    x[1, :, 5] = 0.0  # expert 1 never sees input feature 5
    H = 2 * x.transpose(1, 2) @ x / x.shape[1]
    C = 2 * x.transpose(1, 2) @ x_ref / x.shape[1]
    H[2], C[2] = 0.0, 0.0  # expert 2 received no tokens
    target = compensated_target(w, H, C)
    assert torch.isfinite(target).all()
    assert (target[1, :, 5] == 0).all()
    assert torch.equal(target[2], w[2])
    # An indefinite Hessian cannot be solved: that expert keeps its weights, the others do not.
    H[0] = -torch.eye(24)
    target2 = compensated_target(w, H, C)
    assert torch.equal(target2[0], w[0]) and torch.equal(target2[1], target[1])


def test_compensated_target_rejects_bad_shapes():
    w, _, _, H, C = _drifted()
    with pytest.raises(ValueError, match="need w"):
        compensated_target(w, H[:, :-1, :-1], C)
    with pytest.raises(ValueError, match="need w"):
        compensated_target(w, H, C[:2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compensated_target_cuda_matches_cpu():
    w, _, _, H, C = _drifted()
    cpu = compensated_target(w, H, C)
    gpu = compensated_target(w.cuda(), H.cuda(), C.cuda())
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)
