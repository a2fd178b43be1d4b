"""Batched GPTQ: quantize a group of experts' matrices as one batched problem.

GPTQ (Frantar et al., 2022) quantizes a weight matrix ``W [rows, cols]`` one input column at a
time and spreads each column's rounding error over the columns not yet quantized so that the
layer output ``X W^T`` changes as little as possible, measured by the Hessian ``H = 2 X^T X / n``
of the squared output error. With ``U`` the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``),
column ``i`` is rounded to ``q_i`` and the remaining columns are updated by
``W[:, j] -= (w_i - q_i) / U[i, i] * U[i, j]`` for ``j > i``. Updates are applied lazily: inside a
block of ``block_size`` columns the rank-1 update of each column touches only its sub-block of 16
columns, the rest of the block is updated once per sub-block and the rest of the matrix once per
block, each with one matrix product of the accumulated errors (mathematically the same result as
updating every column at once; only float rounding differs).

QMoE's observation is that the experts of a layer are many small, same-shaped problems; here the
leading dimension ``E`` of ``W [E, rows, cols]`` and ``H [E, cols, cols]`` is batched through every
step (batched Cholesky, ``bmm`` for the lazy updates, per-expert column permutations for
activation order), so one Python loop over columns serves all experts.

Conventions, all per expert:

* Dead columns (``H[i, i] == 0``, an input feature that was always zero) get ``H[i, i] = 1`` and
  ``W[:, i] = 0``, as in reference GPTQ; they do not affect the output for the calibration inputs.
* Dampening adds ``damp * mean(diag(H))`` to the diagonal, the mean taken over live columns so
  that the dead-column 1s do not skew it; ``damp`` defaults to 0.1 for ternary (QMoE) and 0.01
  otherwise.
* The grid is fitted once before GPTQ runs, on the original weights (per group too: "static
  groups"), so it does not depend on the column order and activation order composes with groups.
  The optimized ternary grid is weighted by ``diag(H)``.
* Fallback to round-to-nearest of the original weights (same grid) for an all-zero Hessian (the
  expert received no tokens) or for a damped Hessian whose Cholesky factorisation (or that of its
  inverse) fails. Such an expert runs through the batched loop with an identity inverse factor, so
  no NaN from its factorisation reaches the batch and the others are neither recomputed nor
  disturbed; its values are then replaced by round-to-nearest.
* Arithmetic is float32 on ``w``'s device whatever the input dtypes; on CUDA TF32 matrix products
  are switched off for the duration of the call. Results are deterministic for a given input,
  device and thread count.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .quant import Grid, make_grid

__all__ = ["GPTQResult", "compensated_target", "gptq_quantize"]

# Inside a lazy-update block, rank-1 updates are confined to sub-blocks of this many columns and
# the rest of the block is updated per sub-block with one matrix product: the rank-1 updates are
# memory-bound, so keeping them small matters more than the block size itself.
_SUB_BLOCK = 16


@dataclass
class GPTQResult:
    """Output of :func:`gptq_quantize` for ``E`` experts with ``[rows, cols]`` matrices.

    Attributes:
        qweight: float32 ``[E, rows, cols]``, quantized values (every entry on its row's grid).
        codes: ``[E, rows, cols]``, int8 in ``{-1, 0, 1}`` (ternary) or uint8 (integer grids);
            ``grid.dequantize(codes) == qweight`` exactly.
        grid: the :class:`~qmoe.quant.Grid` (per-row ``lo/hi`` or ``scale/zero``) to store.
        loss: float32 ``[E]``, ``sum over rows of (w - q) H (w - q)^T`` with the undamped ``H`` as
            given and the original weights; with ``H = 2 X^T X / n`` this is
            ``2/n * ||X (W - Q)^T||_F^2``, twice the per-token squared output error.
        fallback: bool ``[E]``, True where the expert was quantized by round-to-nearest.
        reason: per expert, None or why it fell back.
    """

    qweight: torch.Tensor
    codes: torch.Tensor
    grid: Grid
    loss: torch.Tensor
    fallback: torch.Tensor
    reason: list


@contextlib.contextmanager
def _ieee_float32(device: torch.device):
    """Disables TF32 matrix products on CUDA for the duration (float32 GPTQ must stay float32)."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    matmul.allow_tf32 = False
    try:
        yield
    finally:
        matmul.allow_tf32 = saved


def _check_finite(t: torch.Tensor, what: str, names: list[str]) -> None:
    bad = ~torch.isfinite(t).flatten(1).all(dim=1)  # [E]
    if bad.any():
        e = int(bad.nonzero()[0])
        raise ValueError(f"{what} of {names[e]} contains NaN or Inf ({int(bad.sum())} expert(s) affected)")


def _hessian_loss(d: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``sum_rows (d H d^T)`` per expert in float64 for ``d [E, rows, cols]``, ``h [E, cols, cols]``."""
    return (torch.bmm(d, h) * d).double().sum(dim=(1, 2))


def compensated_target(w: torch.Tensor, H: torch.Tensor, C: torch.Tensor, damp: float = 0.01,
                       anchored: torch.Tensor | None = None) -> torch.Tensor:
    """The weights that best reproduce a reference output from the inputs the quantized model sees.

    GPTQ makes ``X Q^T`` close to ``X W^T`` for the inputs ``X`` the layer receives. When those
    inputs already carry quantization error (the hidden activations of an expert whose ``wi`` was
    quantized, or the activations of a model whose earlier blocks were), the output that matters is
    the original one, ``X_ref W^T`` for the same tokens. Since
    ``||X_ref W^T - X Q^T||^2 = ||X_ref W^T - X W*^T||^2 + ||X (W* - Q)^T||^2`` for the least-squares
    solution ``W* = W C^T H^-1`` (with ``H = 2 X^T X / n`` and ``C = 2 X^T X_ref / n``), GPTQ of
    ``W*`` under ``H`` minimises the error against the original output: the quantized layer
    compensates the error upstream of it, not only its own. The solve is regularised as in ridge
    regression, ``W* = W C^T (H + lam I)^-1``: directions the calibration inputs barely span are
    shrunk towards zero instead of being fitted to noise (``X_ref == X`` gives ``W H (H + lam I)^-1``,
    ``W`` itself only for ``lam = 0``). Shrinking rather than regularising towards ``W`` also gives
    more zeros to the ternary grid; on the bundled model it measured lower KL to the original model
    at fewer bits than the ``W``-anchored form (benchmarks/RESULTS.md). At 2-4 bits, though, the
    shrinkage is a bias larger than the quantization error, and with fewer tokens than columns
    ``H`` is singular and shrinking would zero every direction the calibration never reached; such
    experts should be ``anchored``: ``W* = W (C^T + lam I) (H + lam I)^-1`` keeps the unseen part of
    ``W`` (and gives ``W`` back exactly when ``X_ref == X``).

    Args:
        w: ``[E, rows, cols]`` original weights.
        H: ``[E, cols, cols]`` ``2 X^T X / n`` of the inputs the quantized model sees.
        C: ``[E, cols, cols]`` ``2 X^T X_ref / n``, the same tokens' original inputs on the right.
        damp: ``lam`` as a fraction of the mean of ``H``'s diagonal over live columns. A column
            with ``H[i, i] == 0`` (an input that was always zero) gets weight 0, as in GPTQ.
        anchored: bool ``[E]`` (None: all False), experts regularised towards ``w`` instead of zero.

    Returns:
        float32 ``[E, rows, cols]``; an expert without tokens, or whose damped ``H`` is not
        positive definite, keeps its original weights (GPTQ then falls back for it as usual).
    """
    if w.dim() != 3 or H.shape != (w.shape[0], w.shape[2], w.shape[2]) or C.shape != H.shape:
        raise ValueError(f"need w [E, rows, cols] and H, C [E, cols, cols], got {tuple(w.shape)}, "
                         f"{tuple(H.shape)}, {tuple(C.shape)}")
    w = w.float()
    out = torch.empty_like(w)
    with _ieee_float32(w.device):
        for e in range(w.shape[0]):  # one expert at a time: the scratch is two [cols, cols] matrices
            Hd = H[e].to(w.device, torch.float32, copy=True)
            diag = torch.diagonal(Hd)  # view
            dead = diag == 0
            lam = damp * torch.where(dead, torch.zeros_like(diag), diag).sum() / (~dead).sum().clamp_min(1)
            diag += lam
            diag.masked_fill_(dead, 1.0)
            L, info = torch.linalg.cholesky_ex(Hd)
            del Hd
            rhs = C[e].to(w.device, torch.float32) @ w[e].T  # C W^T
            if anchored is not None and bool(anchored[e]):
                rhs += lam * w[e].T.masked_fill(dead[:, None], 0.0)
            target = torch.cholesky_solve(rhs, L).T  # W C^T (H + lam I)^-1, or anchored: W (C^T + lam I) (...)^-1
            solved = int(info) == 0 and not bool(dead.all()) and bool(torch.isfinite(target).all())
            out[e] = target if solved else w[e]
    return out


def gptq_quantize(
    w: torch.Tensor,
    H: torch.Tensor,
    bits: str | int = "ternary",
    ternary_grid: str = "optimized",
    damp: float | None = None,
    block_size: int = 128,
    act_order: bool = False,
    group_size: int | None = None,
    names: list[str] | None = None,
    min_zero_fraction: float = 0.0,
) -> GPTQResult:
    """Quantizes ``E`` experts' weight matrices with GPTQ, batched over experts.

    Args:
        w: ``[E, rows, cols]`` weights (``nn.Linear`` layout, ``y = x w^T``), any float dtype and
            device; not modified.
        H: ``[E, cols, cols]`` per-expert Hessians ``2 X^T X / n`` from each expert's own tokens
            (all zeros for an expert without tokens), any float dtype; moved to ``w``'s device.
        bits: ``"ternary"`` or 2, 3, 4.
        ternary_grid: ``"optimized"`` or ``"minmax"`` (see :func:`qmoe.quant.make_grid`).
        damp: dampening as a fraction of the mean Hessian diagonal; None for 0.1 (ternary) or
            0.01 (integers).
        block_size: columns per lazy-update block (affects speed, not the result beyond rounding).
        act_order: quantize columns in order of decreasing ``H[i, i]`` (per expert).
        group_size: None for per-row grids, else columns per grid group (fitted statically).
        names: ``E`` expert names used in error messages and fallback reasons.
        min_zero_fraction: optimized ternary grid only: sparsity floor of the grid's
            round-to-nearest (see :func:`qmoe.quant.make_grid`); GPTQ's own updates then move
            the final fraction of zeros by a few points either way.

    Returns:
        :class:`GPTQResult`.

    Raises:
        ValueError: on bad shapes or options, or NaN/Inf in ``w`` or ``H`` (naming the expert).
    """
    if w.dim() != 3 or not w.is_floating_point():
        raise ValueError(f"w must be float [experts, rows, cols], got {w.dtype} {tuple(w.shape)}")
    E, rows, cols = w.shape
    if H.shape != (E, cols, cols) or not H.is_floating_point():
        raise ValueError(f"H must be float [experts, cols, cols] = [{E}, {cols}, {cols}], got {H.dtype} {tuple(H.shape)}")
    if names is None:
        names = [f"expert {e}" for e in range(E)]
    elif len(names) != E:
        raise ValueError(f"names has {len(names)} entries for {E} experts")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if damp is None:
        damp = 0.1 if bits == "ternary" else 0.01
    if not damp >= 0:
        raise ValueError(f"damp must be a non-negative fraction, got {damp!r}")

    device = w.device
    _check_finite(w, "weights", names)
    _check_finite(H, "Hessian", names)
    with _ieee_float32(device):
        return _gptq(w.float(), H.to(device=device, dtype=torch.float32), bits, ternary_grid, float(damp),
                     block_size, act_order, group_size, names, min_zero_fraction)


def _gptq(w0, H0, bits, ternary_grid, damp, block_size, act_order, group_size, names, min_zero_fraction) -> GPTQResult:
    E, rows, cols = w0.shape
    device = w0.device
    diag = torch.diagonal(H0, dim1=1, dim2=2)  # [E, cols]
    no_tokens = (H0 == 0).flatten(1).all(dim=1)  # [E]

    # The grid weighs column errors by diag(H); an expert without tokens has nothing to weigh by.
    grid_weight = torch.where(no_tokens[:, None], torch.ones_like(diag), diag.clamp_min(0))
    grid = make_grid(w0, bits, ternary_grid, hessian_diag=grid_weight, group_size=group_size,
                     min_zero_fraction=min_zero_fraction)

    dead = diag == 0  # [E, cols]
    # Working copy, transposed so that a column is contiguous: the per-column updates and the
    # rank-1 updates inside a block then touch contiguous memory. Quantized columns overwrite it.
    WT = w0.transpose(1, 2).clone(memory_format=torch.contiguous_format)  # [E, cols, rows]
    WT.masked_fill_(dead[:, :, None], 0.0)
    H = H0.clone()
    Hd = torch.diagonal(H, dim1=1, dim2=2)  # view: writes go to H
    live = (~dead).sum(dim=1).clamp_min(1)
    mean_diag = torch.where(dead, torch.zeros_like(diag), diag).sum(dim=1) / live  # [E]
    Hd.masked_fill_(dead, 1.0)
    lam = damp * mean_diag  # [E]
    Hd += lam[:, None]

    fallback = no_tokens.clone()
    reason: list[str | None] = ["zero Hessian (expert received no tokens)" if z else None for z in no_tokens.tolist()]
    # Experts already falling back get an identity Hessian so the batched factorisation cannot fail on them.
    eye = torch.eye(cols, device=device)
    H[fallback] = eye

    if act_order:
        perm = torch.argsort(torch.diagonal(H, dim1=1, dim2=2), dim=1, descending=True, stable=True)  # [E, cols]
        WT = torch.gather(WT, 1, perm[:, :, None].expand(-1, -1, rows))
        H = torch.gather(torch.gather(H, 1, perm[:, :, None].expand(-1, -1, cols)), 2, perm[:, None, :].expand(-1, cols, -1))
        columns = perm
    else:
        perm = None
        columns = torch.arange(cols, device=device).expand(E, -1)

    L, info = torch.linalg.cholesky_ex(H)
    Hinv = torch.cholesky_inverse(L)
    U, info_inv = torch.linalg.cholesky_ex(Hinv, upper=True)  # [E, cols, cols], H^-1 = U^T U
    failed = ((info != 0) | (info_inv != 0) | ~torch.isfinite(U).flatten(1).all(dim=1)) & ~fallback
    for e in failed.nonzero().flatten().tolist():
        reason[e] = "Hessian not positive definite after dampening (Cholesky failed)"
    fallback |= failed
    # Identity inverse factor: every column's error stays in place, i.e. round-to-nearest.
    U[fallback] = eye
    del L, Hinv, H

    err_sq = torch.zeros(E, dtype=torch.float64, device=device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        Err1 = torch.empty_like(WT[:, i1:i2])  # [E, count, rows], scaled errors of the block
        for s1 in range(i1, i2, _SUB_BLOCK):
            s2 = min(s1 + _SUB_BLOCK, i2)
            for i in range(s1, s2):
                w_col = WT[:, i : i + 1]  # [E, 1, rows]
                q_col = grid.quantize(w_col.transpose(1, 2), columns[:, i : i + 1]).transpose(1, 2)
                err = (w_col - q_col) / U[:, i, i][:, None, None]  # [E, 1, rows]
                WT[:, i + 1 : s2] -= U[:, i, i + 1 : s2][:, :, None] * err  # rank-1, sub-block only
                WT[:, i : i + 1] = q_col
                Err1[:, i - i1 : i - i1 + 1] = err
            if s2 < i2:  # rest of the block, from this sub-block's errors
                WT[:, s2:i2] -= torch.bmm(U[:, s1:s2, s2:i2].transpose(1, 2), Err1[:, s1 - i1 : s2 - i1])
        err_sq += Err1.double().square().sum(dim=(1, 2))
        if i2 < cols:  # lazy update of all remaining columns from this block's errors
            WT[:, i2:] -= torch.bmm(U[:, i1:i2, i2:].transpose(1, 2), Err1)
    del U

    if perm is not None:
        WT = torch.gather(WT, 1, torch.argsort(perm, dim=1)[:, :, None].expand(-1, -1, rows))
    Q = WT.transpose(1, 2).contiguous()  # [E, rows, cols]
    del WT

    # GPTQ's accumulated squared errors equal tr((W - Q) H_used (W - Q)^T) exactly (W - Q = Err U and
    # U H_used U^T = I); removing the dampening term gives the loss under the Hessian as given. Dead
    # columns are zero in both W and Q, so the dead-column 1s contribute nothing.
    residual_sq = torch.stack(
        [(w0[e] - Q[e]).masked_fill(dead[e][None, :], 0.0).square().sum(dtype=torch.float64) for e in range(E)]
    )  # [E], one expert at a time to keep the scratch small
    loss = err_sq - lam.double() * residual_sq
    if fallback.any():
        # The loop ran these experts with dead columns zeroed (all of them, without tokens); their
        # result is round-to-nearest of the original weights instead.
        idx = fallback.nonzero().flatten()
        Q[idx] = grid.select(idx).quantize(w0[idx])
        loss[idx] = _hessian_loss(w0[idx] - Q[idx], H0[idx])
    codes = grid.codes(Q)
    return GPTQResult(qweight=Q, codes=codes, grid=grid, loss=loss.float(), fallback=fallback, reason=reason)
