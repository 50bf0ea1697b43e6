"""The SAE: its dense reference, Triton kernels for its selected pairs, and sae_forward, which picks between them.

TRITON implements sparse.py's primitives with a kernel each: _spmm_kernel (gather_sum: one program per output row
and block of columns) and _sddmm_kernel (sampled_dots: one program per block of pairs). ReLU's selection takes two
more: _relu_count_kernel writes relu(pre) in place and counts each row's positive codes; their cumulative sum gives
row_ptr, whose last entry (one host sync) sizes the arrays that _compact_kernel fills with those codes, in order.

The sparse path pays only while few codes fire: per selected pair it gathers a few rows of d, where a dense matmul
spends a few d FLOPs on every pair, active or not. So sae_forward measures the share of ReLU's codes that fire on a
sample of tokens and takes the dense reference above SPARSE_MAX_DENSITY (a GPU: estimated from the hardware's
figures) or CPU_SPARSE_MAX_DENSITY (a CPU: measured); BENCHMARKS.md has both crossings. TopK and BatchTopK always
take the sparse path: their k is far below the crossing at the paper's sizes.

Checked against sae_forward_torch by `python -m pytest tests/test_kernels.py`; timed by `python bench.py`.
"""

import torch
import torch.nn.functional as F

from . import sparse
from .backend import SUPPORTED_DTYPES, tl, triton, tuning_configs, use_triton

SPARSE_MAX_DENSITY = 1 / 256  # ReLU's sparse path while at most this share of its codes fire (see above), on a GPU
CPU_SPARSE_MAX_DENSITY = 1 / 8  # and on a CPU


# ---- reference ----

def topk_relu(pre, k):
    """Each row's k largest pre-activations (..., n) through relu, in a row of zeros: TopK's code."""
    values, indices = pre.topk(k, dim=-1)  # (..., k)
    return torch.zeros_like(pre).scatter(-1, indices, F.relu(values))


def sae_forward_torch(x, enc_weight, enc_bias, dec_weight, dec_bias, k=None, batch_topk=False):
    """The definition, differentiable by autograd: returns (x_hat, c). k=None: ReLU; an int: TopK; an int with
    batch_topk=True: BatchTopK's training code, the N k largest relu(pre) of the N tokens together."""
    sparse.check_k(k, enc_weight.shape[0], batch_topk)
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


# ---- Triton kernels ----

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
def _relu_count_kernel(c_ptr,  # (N, n) contiguous, in: pre-activations; out: c = relu(pre), in place
                       count_ptr,  # (N,) int32 out: active codes per row
                       n_dict,  # n
                       BLOCK_N: tl.constexpr):  # codes per block
    row = tl.program_id(0).to(tl.int64)  # int64: N x n passes 2^31 for long batches
    c_row = c_ptr + row * n_dict
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
def _compact_kernel(c_ptr,  # (N, n) contiguous, the code
                    row_ptr,  # (N + 1,) int64: row i's entries go to [row_ptr[i], row_ptr[i + 1])
                    col_ptr,  # (nnz,) int64 out: the code index of each entry
                    val_ptr,  # (nnz,) out: its value, in c's dtype
                    n_dict,  # n
                    BLOCK_N: tl.constexpr):  # codes per block
    row = tl.program_id(0).to(tl.int64)
    c_row = c_ptr + row * n_dict
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
                 idx_ptr,  # (nnz,) int64: which row of `table` each entry gathers
                 val_ptr,  # (nnz,) the weight of each entry
                 table_ptr,  # (K, d) dense, contiguous
                 bias_ptr,  # (d,) added to every output row when HAS_BIAS (else unused)
                 out_ptr,  # (M, d) out, contiguous
                 d,  # width of table and out
                 HAS_BIAS: tl.constexpr,  # add bias_ptr
                 BLOCK_E: tl.constexpr,  # entries gathered at once
                 BLOCK_D: tl.constexpr):  # columns per program (grid axis 1 covers d)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < d
    start, end = tl.load(ptr_ptr + row), tl.load(ptr_ptr + row + 1)
    acc = tl.zeros((BLOCK_E, BLOCK_D), dtype=tl.float32)  # summed over entries once, at the end
    for first in range(start, end, BLOCK_E):
        entries = first + tl.arange(0, BLOCK_E)
        entry_mask = entries < end
        idx = tl.load(idx_ptr + entries, mask=entry_mask, other=0)
        val = tl.load(val_ptr + entries, mask=entry_mask, other=0.0).to(tl.float32)
        rows = tl.load(table_ptr + idx[:, None] * d + cols[None, :],
                       mask=entry_mask[:, None] & col_mask[None, :], other=0.0)  # (BLOCK_E, BLOCK_D) gathered
        acc += val[:, None] * rows.to(tl.float32)
    acc = tl.sum(acc, axis=0)  # (BLOCK_D,)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * d + cols, acc.to(out_ptr.dtype.element_ty), mask=col_mask)


@triton.autotune(configs=tuning_configs(_GATHER_CONFIGS, _GATHER_INTERPRETER_CONFIG), key=["d"])
@triton.jit
def _sddmm_kernel(row_ptr,  # (nnz,) int64: the row of `left` each entry reads
                  idx_ptr,  # (nnz,) int64: the row of `right` each entry reads
                  left_ptr,  # (B, d) contiguous
                  right_ptr,  # (M, d) contiguous
                  out_ptr,  # (nnz,) fp32 out: <left[row], right[idx]>
                  nnz,  # number of entries
                  d,  # width of left and right
                  BLOCK_E: tl.constexpr,  # entries per program
                  BLOCK_D: tl.constexpr):  # columns per step of the dot products
    entries = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    entry_mask = entries < nnz
    rows = tl.load(row_ptr + entries, mask=entry_mask, other=0)
    idx = tl.load(idx_ptr + entries, mask=entry_mask, other=0)
    products = tl.zeros((BLOCK_E, BLOCK_D), dtype=tl.float32)  # summed over d once, at the end
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = entry_mask[:, None] & (cols < d)[None, :]
        left = tl.load(left_ptr + rows[:, None] * d + cols[None, :], mask=mask, other=0.0)
        right = tl.load(right_ptr + idx[:, None] * d + cols[None, :], mask=mask, other=0.0)
        products += left.to(tl.float32) * right.to(tl.float32)
    tl.store(out_ptr + entries, tl.sum(products, axis=1), mask=entry_mask)


# ---- launchers: sparse.py's primitives and ReLU's selection, on inputs SAEForwardSparse has checked ----

def select_relu(pre: torch.Tensor):
    """sparse.select_relu by the kernels: relu over (N, n) pre in place, then its positive codes in CSR order."""
    count = torch.empty(pre.shape[0], device=pre.device, dtype=torch.int32)
    _relu_count_kernel[(pre.shape[0],)](pre, count, pre.shape[1])
    row_ptr = F.pad(torch.cumsum(count, 0), (1, 0))  # (N + 1,) int64
    nnz = int(row_ptr[-1])  # the host sync: it sizes the arrays
    col = torch.empty(max(nnz, 1), device=pre.device, dtype=torch.int64)  # never 0-sized: a valid pointer
    value = torch.empty(max(nnz, 1), device=pre.device, dtype=pre.dtype)
    _compact_kernel[(pre.shape[0],)](pre, row_ptr, col, value, pre.shape[1])
    return row_ptr, col[:nnz], value[:nnz]


def gather_sum(ptr, idx, weight, table, bias=None, out_dtype=None) -> torch.Tensor:
    """sparse.gather_sum by _spmm_kernel: (len(ptr) - 1, d) in out_dtype (default table's), summed in fp32."""
    table = table.contiguous()
    rows, d = ptr.numel() - 1, table.shape[1]
    out = torch.empty((rows, d), device=table.device, dtype=out_dtype or table.dtype)
    if idx.numel() == 0:  # no entries at all: keep the pointers below valid
        idx, weight = idx.new_zeros(1), weight.new_zeros(1)
    grid = lambda meta: (rows, triton.cdiv(d, meta["BLOCK_D"]))
    _spmm_kernel[grid](ptr, idx, weight, table, out if bias is None else bias, out, d, HAS_BIAS=bias is not None)
    return out


def sampled_dots(ptr, idx, left, right) -> torch.Tensor:
    """sparse.sampled_dots by _sddmm_kernel: (nnz,) fp32."""
    nnz, d = idx.numel(), left.shape[1]
    out = torch.empty(nnz, device=left.device, dtype=torch.float32)
    if nnz > 0:  # else an empty grid: nothing to launch
        grid = lambda meta: (triton.cdiv(nnz, meta["BLOCK_E"]),)
        _sddmm_kernel[grid](sparse.pattern_rows(ptr, nnz), idx, left.contiguous(), right.contiguous(), out, nnz, d)
    return out


TRITON = sparse.Ops("triton", gather_sum, sampled_dots, select_relu, SUPPORTED_DTYPES, lambda dtype: dtype)


# ---- what the rest of the code calls ----

def relu_density(x, enc_weight, enc_bias, tokens: int = 64) -> float:
    """The share of ReLU's codes that fire on about `tokens` tokens spread through x: one small matmul, one sync."""
    x2 = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        pre = F.linear(x2[:: max(1, x2.shape[0] // tokens)], enc_weight, enc_bias)  # (~tokens, n)
        return (pre > 0).float().mean().item()


def sae_forward(x, enc_weight, enc_bias, dec_weight, dec_bias, k=None, batch_topk=False):
    """sae_forward_sparse with the dense code: (x_hat (..., d_in), c (..., n_dict)). It runs Triton's primitives where
    use_triton says so (backend.py), except for BatchTopK; a ReLU code firing too densely takes the dense reference."""
    on_triton = use_triton(x, enc_weight, enc_bias, dec_weight, dec_bias) and not batch_topk
    limit = CPU_SPARSE_MAX_DENSITY if x.device.type == "cpu" else SPARSE_MAX_DENSITY
    if k is None and relu_density(x, enc_weight, enc_bias) > limit:
        return sae_forward_torch(x, enc_weight, enc_bias, dec_weight, dec_bias, k, batch_topk)
    x_hat, code = sparse.sae_forward_sparse(x, enc_weight, enc_bias, dec_weight, dec_bias, k, batch_topk, dense=True,
                                            ops=TRITON if on_triton else sparse.TORCH)
    return x_hat, code.dense
