"""Quantizers: grids checked against plain per-row definitions and a brute-force ternary search."""

import math

import numpy as np
import pytest
import torch

from qmoe.quant import Grid, make_grid, quantize_rtn


def _awkward_weights(E=3, rows=37, cols=53, seed=0):
    """Gaussian rows plus rows that stress the fits: one-signed, all zero, constant, heavy-tailed."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(E, rows, cols, generator=g)
    w[0, 0] = w[0, 0].abs()  # no negative weights
    w[0, 1] = -w[0, 1].abs()  # no positive weights
    w[0, 2] = 0.0
    w[1, 0] = 0.7
    w[1, 1] = torch.randn(cols, generator=g) ** 3
    if E > 2:
        w[2, 0, :5] = 0.0
    return w


def _plain_ternary_round(row, a, b):
    """Nearest of {a, 0, b} for each weight of one row, ties at a/2 and b/2 going to 0."""
    return [b if x > b / 2 and b > 0 else (a if x < a / 2 and a < 0 else 0.0) for x in row.tolist()]


def _weighted_error(row, q, d):
    return float(sum(di * (x - qi) ** 2 for x, qi, di in zip(row.tolist(), q, d.tolist())))


def test_minmax_ternary_matches_definition():
    w = _awkward_weights()
    grid = make_grid(w, "ternary", "minmax")
    q = quantize_rtn(w, grid)
    for e in range(w.shape[0]):
        for r in range(w.shape[1]):
            row = w[e, r]
            a, b = min(float(row.min()), 0.0), max(float(row.max()), 0.0)
            assert grid.lo[e, r].item() == pytest.approx(a) and grid.hi[e, r].item() == pytest.approx(b)
            assert q[e, r].tolist() == pytest.approx(_plain_ternary_round(row, a, b))


@pytest.mark.parametrize("min_zero_fraction", [0.0, 0.6])
def test_optimized_ternary_is_the_global_optimum_of_its_objective(min_zero_fraction):
    """Brute force: every admissible b in a fine scan and at every breakpoint 2|w_j| is no better."""
    w = _awkward_weights(E=2, rows=12, cols=19, seed=1)
    d = torch.rand(2, 19, generator=torch.Generator().manual_seed(2)) + 0.05
    grid = make_grid(w, "ternary", "optimized", hessian_diag=d, min_zero_fraction=min_zero_fraction)
    q = quantize_rtn(w, grid)
    for e in range(2):
        for r in range(12):
            row, de = w[e, r], d[e]
            ours = _weighted_error(row, q[e, r].tolist(), de)
            mags = sorted(abs(x) for x in row.tolist())
            floor = 2 * mags[max(1, math.ceil(min_zero_fraction * 19)) - 1] if min_zero_fraction else 0.0
            assert -grid.lo[e, r].item() >= floor and grid.hi[e, r].item() >= floor
            assert (q[e, r] == 0).float().mean().item() >= min_zero_fraction
            amax = float(row.abs().max())
            scan = [amax * 2.5 * i / 400 for i in range(401)] + [2 * m for m in mags] + mags + [floor]
            scan = [b for b in scan if b >= floor]
            # The halves are independent, so scanning a and b separately is a full search.
            best_b = min(_weighted_error(row.clamp_min(0), _plain_ternary_round(row.clamp_min(0), 0.0, b), de) for b in scan)
            best_a = min(_weighted_error(row.clamp_max(0), _plain_ternary_round(row.clamp_max(0), -a, 0.0), de) for a in scan)
            assert ours <= best_a + best_b + 1e-5 * (1 + ours)


def test_zero_fraction_floor_holds_per_row_and_group():
    w = torch.randn(2, 30, 70, generator=torch.Generator().manual_seed(4))
    for group_size in (None, 16):
        for s in (0.5, 0.85):
            grid = make_grid(w, "ternary", min_zero_fraction=s, group_size=group_size)
            zero = quantize_rtn(w, grid) == 0
            size = group_size or 70
            for c0 in range(0, 70, size):
                assert (zero[:, :, c0 : c0 + size].float().mean(dim=2) >= s - 1e-6).all()


@pytest.mark.parametrize("group_size", [None, 8])
def test_optimized_ternary_never_worse_than_minmax(group_size):
    for seed in range(4):
        w = _awkward_weights(seed=seed)
        d = torch.rand(w.shape[0], w.shape[2], generator=torch.Generator().manual_seed(seed)) ** 4
        d[:, 3] = 0.0  # a dead column carries no weight
        opt = make_grid(w, "ternary", "optimized", hessian_diag=d, group_size=group_size)
        mm = make_grid(w, "ternary", "minmax", group_size=group_size)
        err_opt = (d[:, None, :] * (w - quantize_rtn(w, opt)) ** 2).sum(dim=2)  # [E, rows]
        err_mm = (d[:, None, :] * (w - quantize_rtn(w, mm)) ** 2).sum(dim=2)
        assert (err_opt <= err_mm + 1e-6 * err_mm).all()
        assert (opt.lo <= 0).all() and (opt.hi >= 0).all()
    # On Gaussian rows the optimum is far better than min/max (Lloyd-Max 3-level: 0.19 of the energy).
    g = torch.randn(2, 64, 512, generator=torch.Generator().manual_seed(9))
    rel = ((g - quantize_rtn(g, make_grid(g))) ** 2).sum() / (g**2).sum()
    rel_mm = ((g - quantize_rtn(g, make_grid(g, ternary_grid="minmax"))) ** 2).sum() / (g**2).sum()
    assert rel < 0.21 and rel < 0.5 * rel_mm


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_int_grid_matches_plain_asymmetric_rtn(bits):
    w = _awkward_weights()
    grid = make_grid(w, bits)
    q = quantize_rtn(w, grid)
    maxq = np.float32(2**bits - 1)
    for e in range(w.shape[0]):
        for r in range(w.shape[1]):
            # float32 scalars throughout, so that halfway cases round as the float32 code does.
            row = w[e, r].numpy()
            lo, hi = min(row.min(), np.float32(0)), max(row.max(), np.float32(0))
            if lo == hi:
                lo, hi = np.float32(-1), np.float32(1)
            scale = (hi - lo) / maxq
            zero = np.clip(np.round(-lo / scale), 0, maxq)
            expect = [scale * (np.clip(np.round(x / scale) + zero, 0, maxq) - zero) for x in row]
            assert q[e, r].tolist() == pytest.approx(expect, abs=1e-6)
            assert grid.zero[e, r].item() == zero


@pytest.mark.parametrize("bits", ["ternary", 2, 3, 4])
@pytest.mark.parametrize("group_size", [None, 16])
def test_values_on_grid_and_codes_round_trip(bits, group_size):
    w = _awkward_weights(cols=50)
    grid = make_grid(w, bits, group_size=group_size)
    q = quantize_rtn(w, grid)
    codes = grid.codes(w)
    assert q.dtype == torch.float32
    assert torch.equal(grid.dequantize(codes), q)
    assert torch.equal(grid.codes(q), codes)  # quantizing grid values is the identity
    group = torch.arange(50) // (group_size or 50)
    if bits == "ternary":
        assert codes.dtype == torch.int8 and set(codes.unique().tolist()) <= {-1, 0, 1}
        lo = grid.lo if group_size is None else grid.lo[:, :, group]
        hi = grid.hi if group_size is None else grid.hi[:, :, group]
        lo = lo[..., None] if group_size is None else lo
        hi = hi[..., None] if group_size is None else hi
        assert ((q == lo) | (q == hi) | (q == 0)).all()
    else:
        assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
        assert ((grid.zero >= 0) & (grid.zero <= 2**bits - 1) & (grid.zero == grid.zero.round())).all()


@pytest.mark.parametrize("bits", ["ternary", 3])
def test_groups_equal_fitting_each_group_alone(bits):
    w = _awkward_weights(cols=45)
    d = torch.rand(w.shape[0], 45, generator=torch.Generator().manual_seed(3))
    grid = make_grid(w, bits, hessian_diag=d, group_size=10)
    q = quantize_rtn(w, grid)
    for g0 in range(0, 45, 10):
        part = make_grid(w[:, :, g0 : g0 + 10], bits, hessian_diag=d[:, g0 : g0 + 10])
        torch.testing.assert_close(q[:, :, g0 : g0 + 10], quantize_rtn(w[:, :, g0 : g0 + 10], part))
        # A block of columns quantizes the same when told which columns it holds.
        cols = torch.arange(g0, min(g0 + 10, 45))
        assert torch.equal(grid.quantize(w[:, :, cols], cols), q[:, :, cols])


def test_low_precision_input_is_computed_in_float32():
    w = _awkward_weights().to(torch.bfloat16)
    for bits in ("ternary", 4):
        grid = make_grid(w, bits)
        q = quantize_rtn(w, grid)
        assert q.dtype == torch.float32
        assert torch.equal(q, quantize_rtn(w.float(), make_grid(w.float(), bits)))


def test_select_keeps_the_chosen_experts():
    w = _awkward_weights()
    grid = make_grid(w, "ternary")
    sub = grid.select(torch.tensor([2, 0]))
    assert isinstance(sub, Grid)
    assert torch.equal(quantize_rtn(w[[2, 0]], sub), quantize_rtn(w, grid)[[2, 0]])


def test_bad_arguments_raise():
    w = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="bits"):
        make_grid(w, 5)
    with pytest.raises(ValueError, match="ternary_grid"):
        make_grid(w, "ternary", "lloyd")
    with pytest.raises(ValueError, match="experts, rows, cols"):
        make_grid(w[0])
    with pytest.raises(ValueError, match="min_zero_fraction"):
        make_grid(w, "ternary", min_zero_fraction=1.0)
    with pytest.raises(ValueError, match="group_size"):
        make_grid(w, 4, group_size=0)
    with pytest.raises(ValueError, match="hessian_diag"):
        make_grid(w, "ternary", hessian_diag=torch.ones(2, 7))
    with pytest.raises(ValueError, match="non-negative"):
        make_grid(w, "ternary", hessian_diag=-torch.ones(2, 8))
    grid = make_grid(w, 4, group_size=4)
    with pytest.raises(ValueError, match="column indices"):
        grid.quantize(w[:, :, :4])
    with pytest.raises(ValueError, match="8 columns"):
        quantize_rtn(w[:, :, :6], grid)
    with pytest.raises(ValueError, match="shape"):
        grid.quantize(torch.randn(3, 4, 8))
