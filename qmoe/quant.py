"""Per-row quantization grids for batches of expert matrices, and round-to-nearest.

Every function works on a batch of matrices ``w`` of shape ``[E, rows, cols]`` (E experts, one
output row per ``rows`` entry, ``cols`` input features), on any device, and always computes in
float32 whatever the input dtype.

Two grid kinds share one :class:`Grid` container:

* ``"ternary"``: the values ``{a, 0, b}`` with ``a <= 0 <= b`` per row (or per group of columns).
  Rounding is to the nearest grid value: ``w > b/2 -> b``, ``w < a/2 -> a``, else 0 (a tie at
  exactly ``b/2`` goes to 0, so zero is favoured, as in QMoE). Any ``a <= 0 <= b`` decodes with the
  same ternary format, so the choice of ``a, b`` costs no bits per weight in the codes themselves;
  it does change how many codes are zero (see :func:`make_grid`).
* ``"int"``: asymmetric ``bits``-bit integers ``c in [0, 2^bits - 1]`` decoding to
  ``scale * (c - zero)``, ``zero`` an integer in the same range, fitted so that the grid spans
  ``[min(w, 0), max(w, 0)]`` (zero is always exactly representable).

Grids are per output row when ``group_size`` is None, and per ``(row, group of group_size
consecutive columns)`` otherwise; the last group may be shorter. Parameter tensors are ``[E, rows]``
without groups and ``[E, rows, groups]`` with them.

Ternary grid choice (``ternary_grid``):

* ``"minmax"``: QMoE's rule, ``a = min(w, 0)`` and ``b = max(w, 0)`` over the row.
* ``"optimized"``: ``a`` and ``b`` minimise the (optionally Hessian-diagonal-weighted) squared error
  of round-to-nearest onto ``{a, 0, b}``, exactly. With rounding thresholds at ``a/2`` and ``b/2``
  the positive and negative halves of a row do not interact, so each half is a one-dimensional
  problem: choose ``b`` to minimise ``sum_j d_j (w_j - round_b(w_j))^2`` over ``w_j > 0``. For a
  fixed ``b`` the weights that round to ``b`` are the ``k`` largest ones, and for a fixed set of
  ``k`` largest weights the best ``b`` is their ``d``-weighted mean, which reduces the error by
  ``(sum d w)^2 / sum d`` relative to rounding all of them to 0. Nearest rounding is the best
  assignment for any ``b``, so ``min_b error(b) = min_k error_k``: sorting each row once and
  scanning the prefix sums finds the global optimum (no search grid, no Lloyd iterations). The
  min/max level is scored on the same objective and kept for any row half where it is not worse,
  so the optimized grid is never worse than min/max even where rounding blurs a near-tie. Zero
  weights in ``hessian_diag`` (dead columns) simply drop out of the objective; a half whose
  weights are all zero keeps its min/max level.

  The optimum places far more weights on ``a`` and ``b`` than min/max does (a Gaussian row ends up
  roughly 45% zeros instead of ~90%), which lowers the error a lot but also makes a
  sparsity-exploiting code (the QMoE dictionary) longer per weight; compare both on bits and on
  loss before choosing. ``min_zero_fraction`` restricts the optimum to levels that keep at least
  that fraction of each row at zero (``|a|, b >= 2 q`` for the row's quantile ``q`` of ``|w|``);
  the error is still minimised exactly under that constraint, since the only extra candidate is
  the bound itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Grid", "make_grid", "quantize_rtn"]

# Elements per chunk when sorting rows for the optimized ternary fit (sorted keys, indices, flipped
# copies and prefix sums are ~50 bytes per element, so this bounds the scratch to ~200 MB).
_FIT_CHUNK_ELEMENTS = 1 << 22


@dataclass
class Grid:
    """Quantization grid of a batch of ``E`` matrices with ``rows`` output rows each.

    Attributes:
        kind: ``"ternary"`` or ``"int"``.
        bits: 2, 3 or 4 for ``"int"``; None for ``"ternary"``.
        lo: ternary only, float32 ``[E, rows]`` (or ``[E, rows, groups]``), the value ``a <= 0``.
        hi: ternary only, float32, same shape as ``lo``, the value ``b >= 0``.
        scale: int only, float32 ``[E, rows]`` (or ``[E, rows, groups]``), ``> 0``.
        zero: int only, float32 with integral values in ``[0, 2^bits - 1]``, same shape as ``scale``
            (float so that ``code - zero`` cannot wrap around as unsigned arithmetic would).
        group_size: None for one grid per row, else the number of consecutive columns per group.
        cols: number of columns of the matrices the grid was fitted to.
    """

    kind: str
    bits: int | None
    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    group_size: int | None = None
    cols: int = 0

    def select(self, experts: torch.Tensor) -> "Grid":
        """The grid of a subset of the experts (``experts``: index tensor or boolean mask over ``E``)."""
        pick = lambda t: None if t is None else t[experts]  # noqa: E731
        return Grid(self.kind, self.bits, pick(self.lo), pick(self.hi), pick(self.scale), pick(self.zero),
                    self.group_size, self.cols)

    @property
    def maxq(self) -> int:
        """Largest integer code of an ``"int"`` grid."""
        return (1 << self.bits) - 1

    def _params(self, columns: torch.Tensor | None, ncols: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the two parameter tensors broadcastable against ``[E, rows, ncols]``.

        ``columns`` gives the original column index of each of the ``ncols`` columns being
        quantized, ``[ncols]`` or ``[E, ncols]`` (per expert, for activation order); it is only
        needed with groups, and defaults to ``0 .. ncols-1``.
        """
        p, q = (self.lo, self.hi) if self.kind == "ternary" else (self.scale, self.zero)
        if self.group_size is None:
            return p[..., None], q[..., None]  # [E, rows, 1]
        if columns is None:
            if ncols != self.cols:
                raise ValueError(
                    f"grid with group_size={self.group_size} was fitted to {self.cols} columns; "
                    f"quantizing {ncols} columns needs their column indices"
                )
            columns = torch.arange(ncols, device=p.device)
        columns = columns.to(device=p.device, dtype=torch.long)
        groups = columns // self.group_size  # [ncols] or [E, ncols]
        if groups.dim() == 1:
            return p[:, :, groups], q[:, :, groups]  # [E, rows, ncols]
        index = groups[:, None, :].expand(-1, p.shape[1], -1)  # [E, rows, ncols]
        return torch.gather(p, 2, index), torch.gather(q, 2, index)

    def _check_block(self, w: torch.Tensor) -> torch.Tensor:
        p = self.lo if self.kind == "ternary" else self.scale
        if w.dim() != 3 or w.shape[:2] != p.shape[:2]:
            raise ValueError(
                f"expected a weight block of shape [{p.shape[0]}, {p.shape[1]}, cols] for this grid, "
                f"got {tuple(w.shape)}"
            )
        return w.to(device=p.device, dtype=torch.float32)

    def codes(self, w: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        """Integer codes of round-to-nearest.

        Args:
            w: ``[E, rows, n]`` any float dtype: the whole matrix or a block of its columns.
            columns: original column indices of the block (``[n]`` or ``[E, n]``); only needed
                with groups when ``w`` is not the whole matrix.

        Returns:
            ternary: int8 in ``{-1, 0, 1}``; int: uint8 in ``[0, 2^bits - 1]``; shape of ``w``.
        """
        w = self._check_block(w)
        p, q = self._params(columns, w.shape[2])
        if self.kind == "ternary":
            pos = (w > 0.5 * q) & (q > 0)
            neg = (w < 0.5 * p) & (p < 0)
            return pos.to(torch.int8) - neg.to(torch.int8)
        return torch.clamp(torch.round(w / p) + q, 0, self.maxq).to(torch.uint8)

    def dequantize(self, codes: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 values of ``codes`` (as returned by :meth:`codes`), same shape."""
        p, q = self._params(columns, codes.shape[2])
        if self.kind == "ternary":
            codes = codes.to(device=p.device)
            return torch.where(codes > 0, q, torch.where(codes < 0, p, torch.zeros_like(p)))
        return p * (codes.to(device=p.device, dtype=torch.float32) - q)

    def quantize(self, w: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        """Round-to-nearest onto the grid: float32 values, shape of ``w`` (see :meth:`codes`)."""
        if self.kind == "ternary":
            return self.dequantize(self.codes(w, columns), columns)
        w = self._check_block(w)
        p, q = self._params(columns, w.shape[2])
        return p * (torch.clamp(torch.round(w / p) + q, 0, self.maxq) - q)


def _grouped(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``[E, rows, cols]`` -> ``[E, rows, groups, group_size]``, zero-padding the last group.

    Zero padding leaves every fit unchanged: a zero weight is representable exactly by both grid
    kinds and carries no error, and the min/max rules already include 0.
    """
    if group_size is None:
        return x[:, :, None, :]
    pad = (-x.shape[2]) % group_size
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(x.shape[0], x.shape[1], -1, group_size)


def _level_gain(vs: torch.Tensor, s1: torch.Tensor, s0: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Error reduction ``2 b s1_m - b^2 s0_m`` of level ``b`` ([N]) over rounding all to 0.

    ``m`` is the number of magnitudes above ``b/2`` (a prefix of the descending ``vs``), i.e. the
    ones nearest rounding puts on ``b``. Returns ``[N, 1]``.
    """
    m = (vs > 0.5 * b[:, None]).sum(dim=1, keepdim=True)  # [N, 1]
    at_m = (m - 1).clamp_min(0)
    gain = 2 * b[:, None] * torch.gather(s1, 1, at_m) - b[:, None].square() * torch.gather(s0, 1, at_m)
    return torch.where(m > 0, gain, torch.zeros_like(gain))


def _best_levels(vs: torch.Tensor, ds: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """Optimal ``b >= floor`` for magnitudes ``vs`` ([N, n], sorted descending, >= 0), weights ``ds``.

    Candidate ``k`` puts the ``k`` largest magnitudes on ``b`` = their weighted mean, which lowers
    the error of rounding them to 0 by ``s1_k^2 / s0_k`` (prefix sums of ``d v`` and ``d``); the
    best ``k`` with ``b_k >= floor`` maximises that gain. Zero magnitudes (the other half of the
    row) are never candidates. The error is a continuous piecewise quadratic in ``b`` whose local
    minima are such ``b_k``, so with a floor the only other candidate is ``b = floor`` itself.

    The min/max level ``b = vs[:, 0]`` is scored the same way and kept unless the optimum gains
    clearly more (beyond float32 rounding), so that "never worse than min/max" also holds in
    floating point, e.g. for a constant row where both are the same level up to one ulp.

    ``floor`` is ``[N]`` (zeros for no constraint). Returns float32 ``[N]``.
    """
    s1 = torch.cumsum(ds * vs, dim=1)  # [N, n]
    s0 = torch.cumsum(ds, dim=1)
    valid = (vs > 0) & (s0 > 0)
    b_k = s1 / torch.where(valid, s0, torch.ones_like(s0))  # [N, n], candidate levels
    valid &= b_k >= floor[:, None]
    gain = torch.where(valid, s1 * b_k, -1.0)  # s1 * b_k = s1^2 / s0
    best_gain, k = torch.max(gain, dim=1, keepdim=True)  # [N, 1]
    best = torch.gather(b_k, 1, k).squeeze(1)

    b_mm = vs[:, 0]  # [N]
    mm_allowed = (b_mm >= floor)[:, None]
    gain_mm = _level_gain(vs, s1, s0, b_mm)
    gain_floor = _level_gain(vs, s1, s0, floor)
    # Preference on near-ties: min/max, then the floor, then the interior optimum.
    take_floor = ~mm_allowed | (gain_floor > gain_mm + 1e-5 * gain_mm.abs())
    out, out_gain = torch.where(take_floor, floor[:, None], b_mm[:, None]), torch.where(take_floor, gain_floor, gain_mm)
    take_best = torch.gather(valid, 1, k) & (best_gain > out_gain + 1e-5 * out_gain.abs())
    return torch.where(take_best.squeeze(1), best, out.squeeze(1))


def _optimized_ternary(flat: torch.Tensor, weight: torch.Tensor, floor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimized ``(lo, hi)`` ([N] each) for rows ``flat`` [N, n] with error weights ``weight`` [N, n].

    ``floor`` [N] bounds the level magnitudes from below (see :func:`_best_levels`). One ascending
    sort per row serves both halves: the negative weights are a prefix in order of decreasing
    magnitude, the positive weights a suffix that reads the same way backwards. Rows are processed
    in chunks to bound the sort's scratch memory.
    """
    lo = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
    hi = torch.empty_like(lo)
    rows_per_chunk = max(1, _FIT_CHUNK_ELEMENTS // max(1, flat.shape[1]))
    for r0 in range(0, flat.shape[0], rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, flat.shape[0])
        vs, order = torch.sort(flat[r0:r1], dim=1)  # [n_chunk, n], ascending
        ds = torch.gather(weight[r0:r1], 1, order)
        lo[r0:r1] = -_best_levels((-vs).clamp_min(0), ds, floor[r0:r1])
        hi[r0:r1] = _best_levels(vs.flip(1).clamp_min(0), ds.flip(1), floor[r0:r1])
    return lo, hi


def _zero_floor(w: torch.Tensor, group_size: int | None, min_zero_fraction: float) -> torch.Tensor:
    """``2 q`` per row (group) of ``w [E, rows, cols]``, ``q`` its ``min_zero_fraction`` quantile of ``|w|``.

    Ternary levels of at least this magnitude round every ``|w| <= q`` to 0. Returns
    ``[E, rows, groups]`` (groups = 1 without grouping).
    """
    size = w.shape[2] if group_size is None else group_size
    floors = []
    for c0 in range(0, w.shape[2], size):
        part = w[:, :, c0 : c0 + size].abs()  # the last group may be shorter
        k = max(1, math.ceil(min_zero_fraction * part.shape[2]))
        floors.append(2 * torch.kthvalue(part, k, dim=2).values)
    return torch.stack(floors, dim=2)


def _fit_ternary(wg: torch.Tensor, dg: torch.Tensor | None, floor: torch.Tensor | None):
    """Ternary ``(lo, hi)``, each ``[E, rows, groups]``, for grouped weights ``[E, rows, groups, gs]``.

    ``floor`` None gives min/max; otherwise the optimized fit with level magnitudes at least
    ``floor`` ``[E, rows, groups]`` (zeros: unconstrained).
    """
    lo = wg.amin(dim=3).clamp_max(0)
    hi = wg.amax(dim=3).clamp_min(0)
    if floor is None:
        return lo, hi
    n = wg.shape[3]
    flat = wg.reshape(-1, n)  # [N, gs]
    weight = torch.ones_like(flat) if dg is None else dg.expand_as(wg).reshape(-1, n)
    lo_opt, hi_opt = _optimized_ternary(flat, weight, floor.reshape(-1))
    return lo_opt.reshape(lo.shape), hi_opt.reshape(hi.shape)


def _fit_int(wg: torch.Tensor, bits: int):
    """Asymmetric ``(scale, zero)``, each ``[E, rows, groups]``, for grouped weights."""
    maxq = (1 << bits) - 1
    xmin = wg.amin(dim=3).clamp_max(0)
    xmax = wg.amax(dim=3).clamp_min(0)
    # An all-zero row/group has no range; any positive scale represents it exactly.
    empty = xmax == xmin
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.clamp(torch.round(-xmin / scale), 0, maxq)
    return scale, zero


def make_grid(
    w: torch.Tensor,
    bits: str | int = "ternary",
    ternary_grid: str = "optimized",
    hessian_diag: torch.Tensor | None = None,
    group_size: int | None = None,
    min_zero_fraction: float = 0.0,
) -> Grid:
    """Fits a quantization grid per row (or per row and group of columns) of each matrix.

    Args:
        w: ``[E, rows, cols]`` any float dtype, any device; must be finite.
        bits: ``"ternary"`` or 2, 3, 4 (asymmetric integers).
        ternary_grid: ``"optimized"`` (exact weighted-error optimum, never worse than min/max) or
            ``"minmax"`` (QMoE). Ignored for integer grids.
        hessian_diag: optional ``[E, cols]`` non-negative weights of each column's squared error
            (the Hessian diagonal, i.e. the input's second moment, makes the fit minimise the
            output error of round-to-nearest when inputs are uncorrelated). Used by the optimized
            ternary fit only; None weighs all columns equally.
        group_size: None for one grid per row, else a positive number of consecutive columns
            sharing one grid.
        min_zero_fraction: optimized ternary only: constrain ``|a|, b >= 2 q`` with ``q`` the
            row's (group's) ``min_zero_fraction`` quantile of ``|w|``, so that round-to-nearest
            leaves at least that fraction of zeros; the error is minimised exactly under the
            constraint. 0 (default) is unconstrained. A sparsity-exploiting codec pays per
            nonzero, so this trades error for bits; with a floor, min/max is only kept where it
            satisfies it, so "never worse than min/max" then holds only at equal sparsity.

    Returns:
        :class:`Grid` with float32 parameters on ``w``'s device.
    """
    if w.dim() != 3 or not w.is_floating_point():
        raise ValueError(f"expected float weights of shape [experts, rows, cols], got {w.dtype} {tuple(w.shape)}")
    if bits != "ternary" and bits not in (2, 3, 4):
        raise ValueError(f"bits must be 'ternary', 2, 3 or 4, got {bits!r}")
    if ternary_grid not in ("optimized", "minmax"):
        raise ValueError(f"ternary_grid must be 'optimized' or 'minmax', got {ternary_grid!r}")
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size must be None or a positive int, got {group_size!r}")
    if not 0.0 <= min_zero_fraction < 1.0:
        raise ValueError(f"min_zero_fraction must be in [0, 1), got {min_zero_fraction!r}")
    if group_size is not None and group_size >= w.shape[2]:
        group_size = None  # one group spanning the row is a per-row grid
    w = w.float()
    wg = _grouped(w, group_size)  # [E, rows, groups, gs]
    squeeze = (lambda t: t[:, :, 0]) if group_size is None else (lambda t: t)
    if bits == "ternary":
        dg = None
        if hessian_diag is not None:
            if hessian_diag.shape != (w.shape[0], w.shape[2]):
                raise ValueError(
                    f"hessian_diag must be [experts, cols] = [{w.shape[0]}, {w.shape[2]}], "
                    f"got {tuple(hessian_diag.shape)}"
                )
            hd = hessian_diag.to(device=w.device, dtype=torch.float32)
            if not torch.isfinite(hd).all() or (hd < 0).any():
                raise ValueError("hessian_diag must be finite and non-negative")
            dg = _grouped(hd[:, None, :], group_size)  # [E, 1, groups, gs]
        floor = None
        if ternary_grid == "optimized":
            floor = (_zero_floor(w, group_size, min_zero_fraction) if min_zero_fraction > 0
                     else torch.zeros(wg.shape[:3], device=w.device))
        lo, hi = _fit_ternary(wg, dg, floor)
        return Grid("ternary", None, lo=squeeze(lo), hi=squeeze(hi), group_size=group_size, cols=w.shape[2])
    scale, zero = _fit_int(wg, bits)
    return Grid("int", bits, scale=squeeze(scale), zero=squeeze(zero), group_size=group_size, cols=w.shape[2])


def quantize_rtn(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Round-to-nearest of ``w`` (``[E, rows, cols]``, any float dtype) onto ``grid``: float32 values."""
    if w.shape[2] != grid.cols:
        raise ValueError(f"grid was fitted to {grid.cols} columns, weights have {w.shape[2]}")
    return grid.quantize(w)
