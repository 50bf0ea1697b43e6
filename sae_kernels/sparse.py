"""The SAE over its selected (token, element) pairs: one forward and one backward, over either set of primitives.

The SAE of Braun et al. (2024), for N tokens x of width d and a dictionary of n elements, with a ReLU code or,
given k, the TopK code of Gao et al. (2024, "Scaling and evaluating sparse autoencoders") or BatchTopK's training
code. Call S the selected pairs, |S| = nnz, and S_i the elements token i keeps:

    ReLU       S   = {(i, j): pre_ij > 0}                                        nnz = whatever fires
    TopK       S_i = the k largest pre-activations of token i                   nnz = N k
    BatchTopK  S   = the N k largest pre-activations of the whole batch         nnz = N k, any number per token

and c_ij = relu(pre_ij) on S, 0 elsewhere. A selected pre-activation below 0 stays in S with c = 0 (every TopK row
keeps its k pairs, so nothing needs measuring; relu's gate stops its gradient). Given g = dL/dx_hat (N, d) and
g_c = dL/dc from outside (a sparsity term), if any:

    pre       = x W_enc^T + b_enc                        (N, n), the one dense matmul
    D_j       = W_dec_j / ||W_dec_j||                    the decoder's unit-norm columns, recomputed every call
    x_hat_i   = sum_{j in S_i} c_ij D_j + b_dec          decode: a weighted sum of rows of D^T
    g_pre_ij  = (g_i . D_j + g_c_ij) [c_ij > 0]          on S only (SDDMM: g D sampled at S)
    dx_i      = sum_{j in S_i} g_pre_ij W_enc_j          dW_enc_j = sum_{i: j in S_i} g_pre_ij x_i
    db_enc_j  = sum_{i: j in S_i} g_pre_ij               dD_j     = sum_{i: j in S_i} c_ij g_i
    db_dec    = sum_i g_i                                dW_dec_j = (dD_j - D_j (D_j . dD_j)) / ||W_dec_j||

Only the encoder's pre-activation is inherently dense: every other product involves c or g_pre, zero off S, so each
is a sum over the nnz selected pairs instead of a matmul over all N n. Two primitives compute them all, over S in
CSR form (per token, its elements: row_ptr, col, value) or sorted by element (CSC: per element, the tokens it fires
on; one stable sort of nnz indices, so a fixed summation order, deterministic):

    gather_sum    out_b = sum_{e in [ptr_b, ptr_b+1)} w_e table[idx_e] (+ bias): over CSR, x_hat (table D^T)
                  and dx (table W_enc); over CSC, dW_enc (table x), dD (table g) and db_enc (a table of ones)
    sampled_dots  left_b . right[idx_e] for each pair e of b: over CSC, D_j . g_i, reading each element's
                  row of D^T once and gathering the rows of g it meets

TORCH below computes them with F.embedding_bag and torch.sparse.sampled_addmm, in fp32 (fp64 for fp64 inputs);
sae.TRITON with Triton kernels, in the inputs' dtype with fp32 accumulation. The selection is torch.topk for TopK,
select_batch_topk for BatchTopK, and for ReLU each set's select_relu.

Checked against sae.sae_forward_torch by `python -m pytest tests/test_sparse_sae.py tests/test_kernels.py`.
"""

import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .backend import SUPPORTED_DTYPES, autocast_inputs


def check_k(k, n_dict: int, batch_topk: bool = False):
    """k: None (ReLU) or TopK's codes per token, an int from 1 to n_dict, and given if batch_topk; else ValueError."""
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_dict):
        raise ValueError(f"k={k!r}: TopK needs k, the codes it keeps per token, an int from 1 to n_dict={n_dict} "
                         "(or None for the ReLU code)")
    if batch_topk and k is None:
        raise ValueError("batch_topk=True selects k codes per token on average over the batch: give k")


# ---- patterns: the selected pairs in CSR form, row_ptr (N + 1,) and col (nnz,) int64, with their pre-activations ----

def pattern_rows(row_ptr: torch.Tensor, nnz: int) -> torch.Tensor:
    """(nnz,) the token of each pair of a CSR pattern."""
    tokens = torch.arange(row_ptr.numel() - 1, device=row_ptr.device)
    return tokens.repeat_interleave(row_ptr.diff(), output_size=nnz)


def sort_indices(keys: torch.Tensor):
    """torch.sort(keys, stable=True) of (nnz,) int64 keys; on a CPU as one row of a 2-D tensor, sorted on one thread: a
    1-D one gets a parallel radix sort whose passes each wait for all threads, slow on shared cores (BENCHMARKS.md)."""
    values, order = torch.sort(keys.view(1, -1) if keys.device.type == "cpu" else keys, dim=-1, stable=True)
    return values.view(-1), order.view(-1)


def by_element(row_ptr, col, n_dict: int):
    """The CSR pattern sorted by element (CSC): col_ptr (n + 1,), and per pair its element, its token and its
    place in the CSR order (each (nnz,)). No host sync."""
    col_sorted, order = sort_indices(col)
    col_ptr = torch.searchsorted(col_sorted, torch.arange(n_dict + 1, device=col.device))
    return col_ptr, col_sorted, pattern_rows(row_ptr, col.numel())[order], order


def select_topk(pre: torch.Tensor, k: int):
    """Each row's k largest pre-activations: k pairs per token, in any order within a row."""
    values, cols = pre.topk(k, dim=1, sorted=False)  # (N, k) each
    row_ptr = torch.arange(0, pre.shape[0] * k + 1, k, device=pre.device)  # (N + 1,)
    return row_ptr, cols.view(-1), values.view(-1)


def select_batch_topk(pre: torch.Tensor, k: int):
    """The N k largest pre-activations of the whole batch, any number per token, ordered by (token, element).

    A 1-D topk over all N n values runs on one core; instead each row's m largest are the candidates (m = 2k to
    start). The batch's N k largest lie among them unless some row's m-th largest reaches the N k-th largest
    candidate, tau: then that row may hold more above tau, and only those rows are searched again, 4 m wide.
    """
    N, n = pre.shape
    m = min(n, 2 * k)
    values, cols = pre.topk(m, dim=1, sorted=False)  # (N, m) candidates
    cand_value, cand_col = values.reshape(-1), cols.reshape(-1)
    cand_row = torch.arange(N, device=pre.device).repeat_interleave(m)
    floor, width = values.amin(1), torch.full((N,), m, device=pre.device)  # each row's m-th largest, and m
    while True:
        top_value, top = cand_value.topk(N * k, sorted=False)  # (N k,) positions among the candidates
        tau = top_value.amin()
        again = ((floor >= tau) & (width < n)).nonzero().squeeze(1)  # rows that may hold more: one host sync
        if len(again) == 0:
            break
        m = min(n, 4 * int(width[again].max()))
        values, cols = pre[again].topk(m, dim=1, sorted=False)  # (len(again), m)
        keep = ~torch.isin(cand_row, again)  # drop those rows' old candidates, add their new ones
        cand_value = torch.cat([cand_value[keep], values.reshape(-1)])
        cand_col = torch.cat([cand_col[keep], cols.reshape(-1)])
        cand_row = torch.cat([cand_row[keep], again.repeat_interleave(m)])
        floor[again], width[again] = values.amin(1), m
    key, order = sort_indices(cand_row[top] * n + cand_col[top])  # by token, then element
    row_ptr = F.pad(torch.bincount(key // n, minlength=N).cumsum(0), (1, 0))  # (N + 1,)
    return row_ptr, key % n, top_value[order]


def select_relu(pre: torch.Tensor):
    """relu over (N, n) pre-activations in place, and every positive one, ordered by (token, element)."""
    flat = pre.relu_().view(-1).nonzero().squeeze(1)  # (nnz,) positions in the flattened (N, n)
    n = pre.shape[1]
    row_ptr = F.pad(torch.bincount(flat // n, minlength=pre.shape[0]).cumsum(0), (1, 0))
    return row_ptr, flat % n, pre.view(-1)[flat]


# ---- the primitives in PyTorch ----

def gather_sum(ptr, idx, weight, table, bias=None, out_dtype=None) -> torch.Tensor:
    """out[b] = sum over e in [ptr[b], ptr[b + 1]) of weight[e] table[idx[e]] (+ bias): (len(ptr) - 1, d), computed
    in weight's dtype, returned in out_dtype (default table's)."""
    out = F.embedding_bag(idx, table.to(weight.dtype).contiguous(), ptr, mode="sum", per_sample_weights=weight,
                          include_last_offset=True)
    if bias is not None:
        out += bias
    return out.to(out_dtype or table.dtype)


def sampled_dots(ptr, idx, left, right) -> torch.Tensor:
    """(nnz,) left[b] . right[idx[e]] for each e in [ptr[b], ptr[b + 1]): left (B, d), right (M, d)."""
    with warnings.catch_warnings():  # the CSR tensor only carries the pattern; its "beta" notice is noise here
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        mask = torch.sparse_csr_tensor(ptr, idx, left.new_zeros(idx.numel()), (left.shape[0], right.shape[0]),
                                       check_invariants=False)
    return torch.sparse.sampled_addmm(mask, left, right.t(), beta=0).values()


class Ops(NamedTuple):
    """A set of primitives the SAE over its pairs computes with (see the docstring), and the dtypes it takes."""

    name: str  # "torch" or "triton"; the backward's ctx.ops tells which set ran
    gather_sum: Callable  # (ptr, idx, weight, table, bias=None, out_dtype=None) -> (len(ptr) - 1, d)
    sampled_dots: Callable  # (ptr, idx, left, right) -> (nnz,), fp32 or wider
    select_relu: Callable  # (pre) -> (row_ptr, col, value), writing relu(pre) over pre
    dtypes: tuple  # the inputs' dtypes it takes
    compute: Callable  # the inputs' dtype -> the dtype of D^T, the values and the gradients computed inside


TORCH = Ops("torch", gather_sum, sampled_dots, select_relu, (*SUPPORTED_DTYPES, torch.float64),
            lambda dtype: torch.float64 if dtype == torch.float64 else torch.float32)


# ---- autograd ----

class SAEForwardSparse(torch.autograd.Function):
    """(x_hat, row_ptr, col, value, c or None) of sae_forward_sparse, with its arguments, over the selected pairs (the
    module docstring has the math). Gradients arrive through x_hat, value and c, all in the inputs' dtype."""

    @staticmethod
    def forward(ctx, x, enc_weight, enc_bias, dec_weight, dec_bias, ops, k, batch_topk, dense):
        n_dict, d = enc_weight.shape
        tensors = (x, enc_weight, enc_bias, dec_weight, dec_bias)
        assert x.shape[-1] == d and dec_weight.shape == (d, n_dict) and enc_bias.shape == (n_dict,) \
            and dec_bias.shape == (d,), f"shapes {[tuple(t.shape) for t in tensors]}"
        assert len({(t.dtype, t.device) for t in tensors}) == 1 and x.dtype in ops.dtypes, \
            f"all inputs must share a device and one of {ops.dtypes}, got {[(t.dtype, t.device) for t in tensors]}"
        compute = ops.compute(x.dtype)
        x2 = x.reshape(-1, d).contiguous()  # (N, d)
        pre = torch.addmm(enc_bias, x2, enc_weight.t())  # (N, n), the one dense matmul
        if k is None:  # ReLU: its buffer becomes c
            row_ptr, col, value = ops.select_relu(pre)
        else:
            row_ptr, col, value = (select_batch_topk if batch_topk else select_topk)(pre, k)
        value = value.to(compute).relu_()  # (nnz,) the code at the selected pairs
        if dense and k is not None:  # pre is not needed any more: its buffer becomes c
            pre.view(-1).zero_().index_put_((pattern_rows(row_ptr, col.numel()) * n_dict + col,), value.to(pre.dtype))
        c = pre.view(*x.shape[:-1], n_dict) if dense else None
        del pre

        # (n, d) rows of D^T, contiguous: a transposing copy unless W_dec is stored column-major
        dictionary_t = dec_weight.t().to(compute, memory_format=torch.contiguous_format, copy=True)
        norms = torch.linalg.vector_norm(dictionary_t, dim=1, dtype=torch.promote_types(compute, torch.float32))
        dictionary_t.div_(norms[:, None])  # norms (n,) ||W_dec_j||, in fp32 or wider
        x_hat = ops.gather_sum(row_ptr, col, value, dictionary_t, bias=dec_bias, out_dtype=x.dtype)  # (N, d)

        ctx.save_for_backward(x2, enc_weight, dictionary_t, norms, row_ptr, col, value)
        ctx.ops, ctx.x_shape, ctx.column_major = ops, x.shape, dec_weight.t().is_contiguous()
        ctx.mark_non_differentiable(row_ptr, col)
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not as zeros
        return x_hat.view(x.shape), row_ptr, col, value.to(x.dtype), c

    @staticmethod
    def backward(ctx, grad_x_hat, grad_row_ptr, grad_col, grad_value, grad_c):
        needs = ctx.needs_input_grad
        if grad_x_hat is None and grad_value is None and grad_c is None:
            return (None,) * 9
        x2, enc_weight, dictionary_t, norms, row_ptr, col, value = ctx.saved_tensors
        ops, (N, d), n_dict, wide = ctx.ops, x2.shape, enc_weight.shape[0], norms.dtype
        g = grad_x_hat.reshape(N, d).to(dictionary_t.dtype).contiguous() if grad_x_hat is not None else None

        col_ptr, csc_col, csc_rows, order = by_element(row_ptr, col, n_dict)
        value_csc = value[order]
        # g_pre on S, in CSC order (what dW_enc and db_enc sum over), fp32 or wider
        grad_pre = (ops.sampled_dots(col_ptr, csc_rows, dictionary_t, g) if g is not None  # (nnz,) D_j . g_i
                    else torch.zeros_like(value_csc, dtype=wide))
        if grad_value is not None:
            grad_pre += grad_value[order]
        if grad_c is not None:  # possibly expanded (c.sum()): read at the pairs only
            grad_pre += grad_c.reshape(N, n_dict)[csc_rows, csc_col]
        grad_pre.masked_fill_(value_csc <= 0, 0)  # relu's gate

        grad_x = grad_enc_w = grad_enc_b = grad_dec_w = grad_dec_b = None
        if needs[0]:
            grad_pre_csr = torch.empty_like(grad_pre).index_copy_(0, order, grad_pre)
            grad_x = ops.gather_sum(row_ptr, col, grad_pre_csr, enc_weight).view(ctx.x_shape)  # G_pre W_enc
        if needs[1]:
            grad_enc_w = ops.gather_sum(col_ptr, csc_rows, grad_pre, x2)  # (n, d) = G_pre^T x
        if needs[2]:
            grad_enc_b = ops.gather_sum(col_ptr, csc_rows, grad_pre, x2.new_ones(N, 1))[:, 0]  # G_pre^T 1
        if g is not None and needs[3]:
            grad_dict_t = ops.gather_sum(col_ptr, csc_rows, value_csc, g, out_dtype=wide)  # (n, d) = C^T g = dL/dD^T
            unit = dictionary_t.to(wide)
            radial = torch.einsum("nd,nd->n", unit, grad_dict_t)  # (n,) D_j . dD_j
            grad_dict_t.addcmul_(unit, radial[:, None], value=-1).div_(norms[:, None])
            # (d, n) in W_dec's layout: a transposing copy unless W_dec is stored column-major (then a view)
            layout = torch.preserve_format if ctx.column_major else torch.contiguous_format
            grad_dec_w = grad_dict_t.t().to(enc_weight.dtype, memory_format=layout)
        if g is not None and needs[4]:
            grad_dec_b = g.sum(0, dtype=wide).to(enc_weight.dtype)
        return grad_x, grad_enc_w, grad_enc_b, grad_dec_w, grad_dec_b, None, None, None, None


# ---- what the rest of the code calls ----

class SparseCode(NamedTuple):
    """The code c (..., n_dict) as its selected pairs, by token (CSR): token i's pairs are [row_ptr[i],
    row_ptr[i + 1]) of col (their dictionary elements) and value (their codes, >= 0; differentiable)."""

    row_ptr: torch.Tensor  # (N + 1,) int64
    col: torch.Tensor  # (nnz,) int64
    value: torch.Tensor  # (nnz,)
    shape: torch.Size  # the dense code's, (..., n_dict)
    dense: torch.Tensor | None = None  # c itself, where the call asked for it

    def rows(self) -> torch.Tensor:
        """(nnz,) the token (flattened index) of each pair."""
        return pattern_rows(self.row_ptr, self.col.numel())

    def to_dense(self) -> torch.Tensor:
        """c (..., n_dict), differentiable; the call's own where it made one."""
        if self.dense is not None:
            return self.dense
        c = self.value.new_zeros(self.shape.numel())
        return c.index_put((self.rows() * self.shape[-1] + self.col,), self.value).view(self.shape)


def sae_forward_sparse(x, enc_weight, enc_bias, dec_weight, dec_bias, k=None, batch_topk=False, dense=False, ops=TORCH):
    """The SAE on x (..., d_in) over its selected pairs: (x_hat (..., d_in), SparseCode), differentiable in every input.

    enc_weight (n_dict, d_in), enc_bias (n_dict), dec_weight (d_in, n_dict), dec_bias (d_in); the decoder's columns
    are normalised on every call. The code, as in the module's table: ReLU for k=None, TopK for an int k, BatchTopK's
    training code with batch_topk=True as well. dense=True also makes the dense c, SparseCode.dense, over the
    pre-activations' buffer (no extra (N, n_dict) tensor). Gradients flow from x_hat and the code's values (or c).
    ops: the primitives, TORCH (on every device) or sae.TRITON. Under autocast all runs in the autocast dtype.
    """
    check_k(k, enc_weight.shape[0], batch_topk)
    tensors = autocast_inputs(x.device, x, enc_weight, enc_bias, dec_weight, dec_bias)
    with torch.autocast(x.device.type, enabled=False):
        x_hat, row_ptr, col, value, c = SAEForwardSparse.apply(*tensors, ops, k, batch_topk, dense)
    return x_hat, SparseCode(row_ptr, col, value, torch.Size((*x.shape[:-1], enc_weight.shape[0])), c)
