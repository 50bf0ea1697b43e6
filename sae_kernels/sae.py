"""The SAE's forward and backward, exploiting that only a few codes fire per token (Triton).

The SAE of Braun et al. (2024), for N tokens x of width d and a dictionary of n entries, with a ReLU code or,
given k, the TopK code of Gao et al. (2024, "Scaling and evaluating sparse autoencoders"):

    pre   = x W_enc^T + b_enc                   (N, n)   W_enc (n, d)
    c     = relu(pre)                           (N, n)   the code; also an output (the sparsity loss reads it)
       or   relu(pre) at each row's k largest pre-activations, 0 elsewhere      (TopK: k selected per token)
    D     = W_dec / ||W_dec||_columns           (d, n)   unit-norm columns, recomputed every call
    x_hat = c D^T + b_dec                       (N, d)

and its backward, given g = dL/dx_hat (N, d) and g_c = dL/dc from outside (the sparsity term), if any:

    g_pre   = (g D + g_c) * [c > 0]             (N, n)   TopK: c > 0 only at selected entries whose value is > 0
    dx      = g_pre W_enc        dW_enc = g_pre^T x        db_enc = sum_rows g_pre
    dD      = c^T g  (as (n, d))                db_dec = sum_rows g
    dW_dec_j = (dD_j - D_j (D_j . dD_j)) / ||W_dec_j||     (per column j: the unit-norm projection)

Only the encoder's pre-activation is inherently dense. Every other product involves c or g_pre, which are
zero wherever the code is: once training has made the code sparse (k ~ 30-160 active of n = 46,080 per token
in the paper), each is a sum over the N k active (token, code) pairs. We store the active pairs in CSR form
(per token: the codes and their values) and need only two small kernels on them:

    SpMM   out[i] = sum_{entries e of row i} val_e * table[col_e]    (+ bias): a gather and weighted sum of
           table rows. It decodes (x_hat = C D^T + b_dec), gives dx = G_pre W_enc, and, run on the transposed
           pattern (CSC: per code, the tokens it fires on, via a sort), dW_enc = G_pre^T x, dD = C^T g and
           db_enc = G_pre^T 1.
    SDDMM  g_pre_e = <g[row_e], D[:, col_e]> + g_c[row_e, col_e]: the dense-dense product g D sampled at the
           pattern's pairs only, then gated by val_e > 0.

The ReLU code finds its pattern by counting and compacting the positive codes. TopK's comes straight from
torch.topk: row_ptr = k (0, 1, ..., N), the selected indices and their values through relu. A selected entry
whose value relu sets to 0 stays in the pattern (it adds nothing, and the gate stops its gradient), so every
row has exactly k entries and nothing needs measuring: no host sync, no compaction, always the sparse path.

Cost at the paper's shape (N = 8,192, d = 768, n = 46,080, bf16; one pass over an (N, n) tensor is 755 MB):
    eager: 6 dense matmuls of 2 N d n = 580 GFLOP each (3.5 TFLOP, ~5 ms on an H200), ~8 passes over (N, n)
           tensors (pre, relu, relu backward, g D, g_pre), 3-4 of them alive at the peak. Eager TopK adds
           topk's read of pre and two scatters into (N, n) zeros (c, and g_pre in the backward).
    here:  the encoder matmul (580 GFLOP), ~4 passes over (N, n) (write pre, relu + count in place, compact),
           and 6 gathered rows of d per active pair, 6 N k d b = 3 GB of mostly cache-resident reads at k = 40;
           no (N, n) buffer besides c itself and the (N, k) CSR arrays.
    TopK:  the encoder matmul, topk's read of pre (a radix select: one to a few passes), c written over pre's
           buffer (zeros, then N k values): no (N, n) passes beyond pre and c. Then the same k gathered rows
           per token, 6 N k d b = 2.4 GB at k = 32 (4.8 GB at 64, 9.7 GB at 128).
The sparse path loses when codes are not sparse (at initialisation about half fire): per active pair it moves
~12 d bytes through gathers, where a dense matmul spends 10 d FLOPs on every pair, active or not. With
~2.4 TB/s of gather bandwidth against ~700 TFLOP/s of bf16 matmul that crosses over near a density of
1/300, so the ReLU forward measures the density and takes the sparse path when at most SPARSE_MAX_DENSITY =
1/256 of the codes fire on average (180 per token at n = 46,080), the dense (cuBLAS) path otherwise; measuring
costs one host sync per forward. TopK never measures: its k (32 to 128) is below that threshold at the
paper's sizes; a k of more than ~n/256 would be faster through dense matmuls, which TopK does not offer.
These are estimates from the hardware's figures; `python bench.py` times the ReLU paths and TopK (BENCHMARKS.md).

Where Triton does not run (a CPU, E2ESAE_BACKEND=torch) and for BatchTopK (given k and batch_topk: the N k largest
pre-activations of the batch, any number per token), sparse.py computes the same products over the selected pairs
in PyTorch.

Checked against sae_forward_torch by `python -m pytest tests/test_kernels.py`; timed by `python bench.py`.
"""

import torch
import torch.nn.functional as F

from . import sparse
from .backend import autocast_dtype, tl, triton, tuning_configs, use_triton
from .sparse import check_k, check_sae_inputs

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Take the sparse path when the mean share of active codes is at most this (see the docstring).
SPARSE_MAX_DENSITY = 1 / 256


# ----------------------------------------------------------------------------------------------------------
# Reference


def topk_relu(pre, k):
    """Each row's k largest pre-activations (..., n) through relu, in a row of zeros: TopK's code."""
    values, indices = pre.topk(k, dim=-1)  # (..., k)
    return torch.zeros_like(pre).scatter(-1, indices, F.relu(values))


def sae_forward_torch(x, enc_weight, enc_bias, dec_weight, dec_bias, k=None, batch_topk=False):
    """The definition, differentiable by autograd: returns (x_hat, c). k=None: ReLU; an int: TopK; an int with
    batch_topk=True: BatchTopK's training code, the N k largest relu(pre) of the N tokens together."""
    check_k(k, enc_weight.shape[0])
    pre = F.linear(x, enc_weight, enc_bias)  # (..., n_dict)
    if k is None:
        c = F.relu(pre)
    elif batch_topk:  # k per token on average, any number for each
        c = topk_relu(pre.flatten(), k * (pre.numel() // pre.shape[-1])).view_as(pre)
    else:
        c = topk_relu(pre, k)
    dictionary = dec_weight / dec_weight.norm(dim=0, keepdim=True)  # (d_in, n_dict), unit-norm columns
    x_hat = F.linear(c, dictionary, dec_bias)  # (..., d_in)
    return x_hat, c


# ----------------------------------------------------------------------------------------------------------
# Triton kernels

_ROW_SWEEP_CONFIGS = [triton.Config({"BLOCK_N": 2048}, num_warps=8),
                      triton.Config({"BLOCK_N": 4096}, num_warps=8),
                      triton.Config({"BLOCK_N": 1024}, num_warps=4)]
_GATHER_CONFIGS = [triton.Config({"BLOCK_E": 16, "BLOCK_D": 128}, num_warps=4),
                   triton.Config({"BLOCK_E": 32, "BLOCK_D": 128}, num_warps=4),
                   triton.Config({"BLOCK_E": 16, "BLOCK_D": 256}, num_warps=8),
                   triton.Config({"BLOCK_E": 64, "BLOCK_D": 64}, num_warps=4)]
_ROW_SWEEP_INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 32})
_GATHER_INTERPRETER_CONFIG = triton.Config({"BLOCK_E": 16, "BLOCK_D": 32})


@triton.autotune(configs=tuning_configs(_ROW_SWEEP_CONFIGS, _ROW_SWEEP_INTERPRETER_CONFIG), key=["n_dict"])
@triton.jit
def _relu_count_kernel(c_ptr,  # (N, n) in: pre-activations; out: c = relu(pre), in place
                       count_ptr,  # (N,) int32 out: active codes per row
                       n_dict,  # n
                       stride_row,  # elements between rows of c (codes are contiguous)
                       BLOCK_N: tl.constexpr):  # codes per block
    row = tl.program_id(0).to(tl.int64)  # int64: N x n passes 2^31 for long batches
    c_row = c_ptr + row * stride_row
    count = tl.zeros((BLOCK_N,), dtype=tl.int32)  # per lane; reduced once at the end
    for start in range(0, n_dict, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < n_dict
        code = tl.maximum(tl.load(c_row + cols, mask=mask, other=0.0).to(tl.float32), 0.0)
        tl.store(c_row + cols, code.to(c_ptr.dtype.element_ty), mask=mask)
        count += (code > 0).to(tl.int32)
    tl.store(count_ptr + row, tl.sum(count, axis=0))


@triton.autotune(configs=tuning_configs(_ROW_SWEEP_CONFIGS, _ROW_SWEEP_INTERPRETER_CONFIG), key=["n_dict"])
@triton.jit
def _compact_kernel(c_ptr,  # (N, n) the code
                    row_ptr,  # (N + 1,) int64: row i's entries go to [row_ptr[i], row_ptr[i + 1])
                    col_ptr,  # (nnz,) int32 out: the code index of each entry
                    val_ptr,  # (nnz,) out: its value, in c's dtype
                    n_dict,  # n
                    stride_row,  # elements between rows of c
                    BLOCK_N: tl.constexpr):  # codes per block
    row = tl.program_id(0).to(tl.int64)
    c_row = c_ptr + row * stride_row
    next_slot = tl.load(row_ptr + row)
    for start in range(0, n_dict, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        code = tl.load(c_row + cols, mask=cols < n_dict, other=0.0)
        active = code.to(tl.float32) > 0
        slot = next_slot + tl.cumsum(active.to(tl.int32), axis=0) - 1  # keeps the codes in order
        tl.store(col_ptr + slot, cols, mask=active)
        tl.store(val_ptr + slot, code, mask=active)
        next_slot += tl.sum(active.to(tl.int32), axis=0)


@triton.autotune(configs=tuning_configs(_GATHER_CONFIGS, _GATHER_INTERPRETER_CONFIG), key=["d"])
@triton.jit
def _spmm_kernel(ptr_ptr,  # (M + 1,) int64: output row i sums entries [ptr[i], ptr[i + 1])
                 idx_ptr,  # (nnz,) int32: which row of `table` each entry gathers
                 val_ptr,  # (nnz,) the weight of each entry
                 table_ptr,  # (K, d) dense, rows contiguous
                 bias_ptr,  # (d,) added to every output row when HAS_BIAS (else unused)
                 out_ptr,  # (M, d) out, contiguous
                 d,  # width of table and out
                 stride_table,  # elements between rows of table
                 HAS_BIAS: tl.constexpr,  # add bias_ptr
                 BLOCK_E: tl.constexpr,  # entries gathered at once
                 BLOCK_D: tl.constexpr):  # columns per program (grid axis 1 covers d)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < d
    start = tl.load(ptr_ptr + row)
    end = tl.load(ptr_ptr + row + 1)
    acc = tl.zeros((BLOCK_E, BLOCK_D), dtype=tl.float32)  # summed over entries once, at the end
    for first in range(start, end, BLOCK_E):
        entries = first + tl.arange(0, BLOCK_E)
        entry_mask = entries < end
        idx = tl.load(idx_ptr + entries, mask=entry_mask, other=0).to(tl.int64)
        val = tl.load(val_ptr + entries, mask=entry_mask, other=0.0).to(tl.float32)
        rows = tl.load(table_ptr + idx[:, None] * stride_table + cols[None, :],
                       mask=entry_mask[:, None] & col_mask[None, :], other=0.0)  # (BLOCK_E, BLOCK_D) gathered
        acc += val[:, None] * rows.to(tl.float32)
    acc = tl.sum(acc, axis=0)  # (BLOCK_D,)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * d + cols, acc.to(out_ptr.dtype.element_ty), mask=col_mask)


@triton.autotune(configs=tuning_configs(_GATHER_CONFIGS, _GATHER_INTERPRETER_CONFIG), key=["d"])
@triton.jit
def _sddmm_kernel(entry_row_ptr,  # (nnz,) int32: the row (token) of each active entry
                  col_ptr,  # (nnz,) int32: its column (code)
                  left_ptr,  # (N, d) g = dL/dx_hat, rows contiguous (unused unless HAS_LEFT)
                  right_ptr,  # (n, d) D^T, rows contiguous
                  extra_ptr,  # (N, n) g_c = dL/dc, any strides, even 0 (unused unless HAS_EXTRA)
                  out_ptr,  # (nnz,) fp32 out: <left[row], right[col]> + extra[row, col]
                  nnz,  # number of entries
                  d,  # width of left and right
                  stride_left,  # elements between rows of left
                  stride_right,  # elements between rows of right
                  stride_extra_row,  # strides of extra
                  stride_extra_col,
                  HAS_LEFT: tl.constexpr,  # x_hat received a gradient
                  HAS_EXTRA: tl.constexpr,  # c received a gradient
                  BLOCK_E: tl.constexpr,  # entries per program
                  BLOCK_D: tl.constexpr):  # columns per step of the dot products
    entries = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    entry_mask = entries < nnz
    rows = tl.load(entry_row_ptr + entries, mask=entry_mask, other=0).to(tl.int64)
    codes = tl.load(col_ptr + entries, mask=entry_mask, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    if HAS_LEFT:
        products = tl.zeros((BLOCK_E, BLOCK_D), dtype=tl.float32)  # summed over d once, at the end
        for start in range(0, d, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            mask = entry_mask[:, None] & (cols < d)[None, :]
            left = tl.load(left_ptr + rows[:, None] * stride_left + cols[None, :], mask=mask, other=0.0)
            right = tl.load(right_ptr + codes[:, None] * stride_right + cols[None, :], mask=mask, other=0.0)
            products += left.to(tl.float32) * right.to(tl.float32)
        acc += tl.sum(products, axis=1)
    if HAS_EXTRA:
        extra = tl.load(extra_ptr + rows * stride_extra_row + codes * stride_extra_col, mask=entry_mask, other=0.0)
        acc += extra.to(tl.float32)
    tl.store(out_ptr + entries, acc, mask=entry_mask)


# ----------------------------------------------------------------------------------------------------------
# Launchers


def relu_count_(pre: torch.Tensor) -> torch.Tensor:
    """relu in place on (N, n) pre-activations; returns the (N,) int32 count of active codes per row."""
    assert pre.dim() == 2 and pre.stride(1) == 1 and pre.dtype in SUPPORTED_DTYPES, f"{pre.shape} {pre.dtype}"
    count = torch.empty(pre.shape[0], device=pre.device, dtype=torch.int32)
    _relu_count_kernel[(pre.shape[0],)](pre, count, pre.shape[1], pre.stride(0))
    return count


def compact(c: torch.Tensor, row_ptr: torch.Tensor, nnz: int):
    """The active entries of (N, n) c in CSR order: (col (nnz,) int32, val (nnz,) c.dtype)."""
    assert c.dim() == 2 and c.stride(1) == 1 and row_ptr.dtype == torch.int64 and row_ptr.numel() == c.shape[0] + 1
    col = torch.empty(max(nnz, 1), device=c.device, dtype=torch.int32)  # never 0-sized: a valid pointer
    val = torch.empty(max(nnz, 1), device=c.device, dtype=c.dtype)
    _compact_kernel[(c.shape[0],)](c, row_ptr, col, val, c.shape[1], c.stride(0))
    return col[:nnz], val[:nnz]


def relu_pattern_(pre: torch.Tensor):
    """ReLU's code in place of (N, n) pre-activations; its CSR pattern (row_ptr, col, val) if at most
    SPARSE_MAX_DENSITY of the codes fire (one host sync measures it), else None: decode densely."""
    count = relu_count_(pre)
    row_ptr = F.pad(torch.cumsum(count, 0), (1, 0))  # (N + 1,) int64
    nnz = int(row_ptr[-1])  # the one host sync: it sizes the CSR arrays and picks the path
    if nnz > SPARSE_MAX_DENSITY * pre.shape[0] * pre.shape[1]:
        return None
    return (row_ptr, *compact(pre, row_ptr, nnz))


def topk_(pre: torch.Tensor, k: int):
    """TopK's code in place of (N, n) pre-activations; its CSR pattern (row_ptr, col, val), k entries per row.

    Selected entries that relu sets to 0 stay in the pattern: every row has k entries, so nothing is measured.
    """
    values, indices = torch.topk(pre, k, dim=1, sorted=False)  # (N, k) each; any order within a row will do
    values.relu_()
    pre.zero_().scatter_(1, indices, values)  # c, in pre's buffer
    row_ptr = torch.arange(pre.shape[0] + 1, device=pre.device, dtype=torch.int64) * k  # (N + 1,)
    return row_ptr, indices.to(torch.int32).view(-1), values.view(-1)


def spmm(ptr, idx, val, table, bias=None, out_dtype=None) -> torch.Tensor:
    """Sparse (CSR: ptr, idx, val) times dense (K, d) table, plus an optional (d,) bias: (M, d)."""
    assert ptr.dtype == torch.int64 and idx.dtype == torch.int32 and idx.shape == val.shape, "bad CSR arrays"
    assert table.dim() == 2 and table.stride(1) == 1, f"table {table.shape} must have contiguous rows"
    assert bias is None or bias.shape == (table.shape[1],), f"bias {bias.shape}"
    rows, d = ptr.numel() - 1, table.shape[1]
    out = torch.empty((rows, d), device=table.device, dtype=out_dtype or table.dtype)
    if idx.numel() == 0:  # no entries at all: keep the pointers below valid
        idx, val = idx.new_zeros(1), val.new_zeros(1)
    grid = lambda meta: (rows, triton.cdiv(d, meta["BLOCK_D"]))
    _spmm_kernel[grid](ptr, idx, val, table, out if bias is None else bias, out, d, table.stride(0),
                       HAS_BIAS=bias is not None)
    return out


def sddmm(entry_row, col, left, right, extra=None) -> torch.Tensor:
    """(nnz,) fp32: <left[entry_row], right[col]> (if left is given) + extra[entry_row, col] (if given)."""
    assert entry_row.dtype == torch.int32 and col.dtype == torch.int32 and entry_row.shape == col.shape
    assert right.dim() == 2 and right.stride(1) == 1, f"right {right.shape} must have contiguous rows"
    assert left is None or (left.dim() == 2 and left.stride(1) == 1 and left.shape[1] == right.shape[1])
    assert left is not None or extra is not None, "nothing to compute"
    nnz, d = col.numel(), right.shape[1]
    out = torch.empty(max(nnz, 1), device=right.device, dtype=torch.float32)
    if nnz == 0:
        return out[:0]
    extra_strides = extra.stride() if extra is not None else (0, 0)
    grid = lambda meta: (triton.cdiv(nnz, meta["BLOCK_E"]),)
    _sddmm_kernel[grid](entry_row, col, left if left is not None else right, right,
                        extra if extra is not None else right, out, nnz, d,
                        left.stride(0) if left is not None else 0, right.stride(0), *extra_strides,
                        HAS_LEFT=left is not None, HAS_EXTRA=extra is not None)
    return out


def transpose_pattern(row_ptr: torch.Tensor, col: torch.Tensor, n_cols: int):
    """CSR -> CSC: (col_ptr (n_cols + 1,) int64, rows (nnz,) int32 sorted by column, order (nnz,))."""
    rows = row_ptr.numel() - 1
    entry_row = torch.repeat_interleave(torch.arange(rows, device=col.device, dtype=torch.int32),
                                        row_ptr.diff(), output_size=col.numel())  # (nnz,) no host sync
    sorted_col, order = torch.sort(col, stable=True)  # stable: a fixed summation order, deterministic
    col_ptr = torch.searchsorted(sorted_col, torch.arange(n_cols + 1, device=col.device, dtype=torch.int32))
    return col_ptr, entry_row[order], order, entry_row


def unit_norm_backward(grad_dictionary_t, dictionary_t, norms) -> torch.Tensor:
    """dL/dW_dec (d, n) from dL/dD^T (n, d) fp32 (overwritten) through D = W_dec / ||W_dec||_columns."""
    unit = dictionary_t.float()  # (n, d) rows of D^T
    radial = torch.bmm(unit.unsqueeze(1), grad_dictionary_t.unsqueeze(2)).squeeze(2)  # (n, 1) = D_j . dD_j
    grad_t = grad_dictionary_t.addcmul_(unit, radial, value=-1).div_(norms[:, None])  # (n, d), in place
    return grad_t.t().to(dictionary_t.dtype, memory_format=torch.contiguous_format)  # (d, n)


# ----------------------------------------------------------------------------------------------------------
# Autograd


class SAEForwardTriton(torch.autograd.Function):
    """(x_hat, c) of the SAE; sparse kernels when few codes fire, cuBLAS otherwise (see the docstring).

    k=None: the ReLU code, on either path; k an int: the TopK code, always on the sparse path.
    """

    @staticmethod
    def forward(ctx, x, enc_weight, enc_bias, dec_weight, dec_bias, k):
        n_dict, d = check_sae_inputs(x, enc_weight, enc_bias, dec_weight, dec_bias, SUPPORTED_DTYPES)
        x2 = x.reshape(-1, d).contiguous()  # (N, d)
        enc_weight = enc_weight.contiguous()

        c = torch.addmm(enc_bias, x2, enc_weight.t())  # (N, n) pre-activations, the one dense matmul
        pattern = relu_pattern_(c) if k is None else topk_(c, k)  # c = the code, in place
        norms = torch.linalg.vector_norm(dec_weight, dim=0, dtype=torch.float32)  # (n,)
        dictionary_t = dec_weight.t().clone(memory_format=torch.contiguous_format)  # (n, d), to become D^T
        dictionary_t.div_(norms[:, None])

        ctx.sparse = pattern is not None
        if ctx.sparse:
            row_ptr, col, val = pattern
            x_hat = spmm(row_ptr, col, val, dictionary_t, bias=dec_bias)  # (N, d)
            ctx.save_for_backward(x2, enc_weight, dictionary_t, norms, row_ptr, col, val)
        else:
            x_hat = torch.addmm(dec_bias, c, dictionary_t)  # (N, n) @ (n, d)
            ctx.save_for_backward(x2, enc_weight, dictionary_t, norms, c)
        ctx.x_shape = x.shape
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not as zeros
        return x_hat.view(x.shape), c.view(*x.shape[:-1], n_dict)

    @staticmethod
    def backward(ctx, grad_x_hat, grad_c):
        needs = ctx.needs_input_grad
        if grad_x_hat is None and grad_c is None:
            return None, None, None, None, None, None
        x2, enc_weight, dictionary_t, norms = ctx.saved_tensors[:4]
        n_dict, d = enc_weight.shape
        g = grad_x_hat.reshape(-1, d).contiguous() if grad_x_hat is not None else None  # (N, d)
        g_c = grad_c.reshape(-1, n_dict) if grad_c is not None else None  # (N, n), possibly expanded
        grad_x = grad_enc_w = grad_enc_b = grad_dec_w = grad_dec_b = None

        if ctx.sparse:  # ReLU's active codes or TopK's selection: one backward for both
            row_ptr, col, val = ctx.saved_tensors[4:]
            col_ptr, csc_rows, order, entry_row = transpose_pattern(row_ptr, col, n_dict)
            grad_pre = sddmm(entry_row, col, g, dictionary_t, g_c)  # (nnz,) fp32, g_pre at the pattern's pairs
            grad_pre.masked_fill_(val <= 0, 0)  # relu's gate: a no-op for ReLU's pattern, whose values are all > 0
            if needs[0]:
                grad_x = spmm(row_ptr, col, grad_pre, enc_weight)  # (N, d) = G_pre W_enc
            grad_pre_csc = grad_pre[order]
            if needs[1]:
                grad_enc_w = spmm(col_ptr, csc_rows, grad_pre_csc, x2)  # (n, d) = G_pre^T x
            if needs[2]:
                ones = x2.new_ones(x2.shape[0], 1)
                grad_enc_b = spmm(col_ptr, csc_rows, grad_pre_csc, ones, out_dtype=torch.float32)[:, 0]
            if g is not None and needs[3]:
                grad_dict_t = spmm(col_ptr, csc_rows, val[order], g, out_dtype=torch.float32)  # (n, d) = C^T g
                grad_dec_w = unit_norm_backward(grad_dict_t, dictionary_t, norms)
        else:
            (c,) = ctx.saved_tensors[4:]
            if g is not None:
                grad_pre = g @ dictionary_t.t()  # (N, d) @ (d, n)
                if g_c is not None:
                    grad_pre += g_c
            else:
                grad_pre = g_c.clone(memory_format=torch.contiguous_format)
            grad_pre.masked_fill_(c <= 0, 0)  # relu's gate: c > 0 exactly where pre > 0
            if needs[0]:
                grad_x = grad_pre @ enc_weight  # (N, n) @ (n, d)
            if needs[1]:
                grad_enc_w = grad_pre.t() @ x2  # (n, N) @ (N, d)
            if needs[2]:
                grad_enc_b = grad_pre.sum(0, dtype=torch.float32)
            if g is not None and needs[3]:
                grad_dict_t = (c.t() @ g).float()  # (n, N) @ (N, d)
                grad_dec_w = unit_norm_backward(grad_dict_t, dictionary_t, norms)

        if g is not None and needs[4]:
            grad_dec_b = g.sum(0, dtype=torch.float32).to(g.dtype)
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
        if grad_enc_b is not None:
            grad_enc_b = grad_enc_b.to(enc_weight.dtype)
        return grad_x, grad_enc_w, grad_enc_b, grad_dec_w, grad_dec_b, None


# ----------------------------------------------------------------------------------------------------------
# What the rest of the code calls


def sae_forward(x, enc_weight, enc_bias, dec_weight, dec_bias, k=None, batch_topk=False):
    """The SAE on x (..., d_in): returns (x_hat (..., d_in), c (..., n_dict)). Differentiable in every input.

    enc_weight (n_dict, d_in), enc_bias (n_dict), dec_weight (d_in, n_dict), dec_bias (d_in); the decoder's
    columns are normalised on every call. k=None: the ReLU code; k an int from 1 to n_dict: TopK, each token's
    k largest pre-activations through relu; with batch_topk=True, BatchTopK's training code, the N k largest of
    the N tokens together (c is dense either way). Triton on CUDA (see backend.py); elsewhere, and for BatchTopK
    everywhere, the PyTorch path over the selected pairs (sparse.py), which ReLU takes only while a sample of
    tokens shows at most sparse.SPARSE_MAX_DENSITY of its codes firing on a CPU, SPARSE_MAX_DENSITY on a GPU (the
    dense reference otherwise). Under autocast both run in the autocast dtype.
    """
    check_k(k, enc_weight.shape[0])
    if batch_topk and k is None:
        raise ValueError("batch_topk=True selects k codes per token on average over the batch: give k")
    on_triton = use_triton(x, enc_weight, enc_bias, dec_weight, dec_bias)
    if batch_topk or not on_triton:
        # ReLU: the crossing measured on a CPU; on a GPU (E2ESAE_BACKEND=torch) cuBLAS's, estimated above
        limit = sparse.SPARSE_MAX_DENSITY if x.device.type == "cpu" else SPARSE_MAX_DENSITY
        if k is None and sparse.relu_density(x, enc_weight, enc_bias) > limit:
            return sae_forward_torch(x, enc_weight, enc_bias, dec_weight, dec_bias)
        x_hat, code = sparse.sae_forward_sparse(x, enc_weight, enc_bias, dec_weight, dec_bias, k, batch_topk,
                                                dense=True)
        return x_hat, code.dense
    tensors = (x, enc_weight, enc_bias, dec_weight, dec_bias)
    dtype = autocast_dtype(x.device)
    if dtype is not None:  # what autocast would do to the matmuls, done once for every kernel
        tensors = tuple(t.to(dtype) for t in tensors)
    with torch.autocast(x.device.type, enabled=False):
        return SAEForwardTriton.apply(*tensors, k)
