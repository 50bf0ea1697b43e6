"""The SAE over its selected (token, element) pairs only, in PyTorch: the path wherever Triton does not run.

The SAE of sae.py (its docstring has the math; `sae.sae_forward_torch` is the dense reference), for N tokens x of
width d and a dictionary of n elements. Call S the selected pairs, |S| = nnz, and S_i the elements token i keeps:

    TopK       S_i = the k largest pre-activations of token i                   nnz = N k
    BatchTopK  S   = the N k largest pre-activations of the whole batch         nnz = N k, any number per token
    ReLU       S   = {(i, j): pre_ij > 0}                                        nnz = whatever fires

and c_ij = relu(pre_ij) on S, 0 elsewhere (a selected pre-activation below 0 stays in S with c = 0; relu's gate
stops its gradient). Only the encoder is dense; every other product runs over S:

    pre       = x W_enc^T + b_enc                        the one dense matmul, 2 N d n FLOPs
    x_hat_i   = sum_{j in S_i} c_ij D_j + b_dec          decode: a weighted sum of k rows of D^T
    g_pre_ij  = (g_i . D_j + g_c_ij) [c_ij > 0]          on S only (SDDMM: g D sampled at S)
    dx_i      = sum_{j in S_i} g_pre_ij W_enc_j          dW_enc_j = sum_{i: j in S_i} g_pre_ij x_i
    db_enc_j  = sum_{i: j in S_i} g_pre_ij               dD_j     = sum_{i: j in S_i} c_ij g_i
    dW_dec_j  = (dD_j - D_j (D_j . dD_j)) / ||W_dec_j||  through D_j = W_dec_j / ||W_dec_j|| (column j)

A weighted sum of gathered table rows is `F.embedding_bag(mode="sum", per_sample_weights=...)`: with S in CSR form
(per token, its elements: row_ptr, col, value) it decodes and gives dx; with S sorted by element (CSC: per element,
the tokens it fires on; one sort of nnz indices) it gives dW_enc from the rows of x and dD from the rows of g. The
SDDMM is `torch.sparse.sampled_addmm` on the CSC pattern: each element's row of D^T is read once and the rows of g
it meets (6 MB, cache-resident) are gathered. db_enc is an index_add of nnz numbers.

Cost of one TopK training step at N = 2,048, d = 768, n = 12,288, k = 32, fp32 (each dense product 2 N d n =
38.7 GFLOP; one (N, n) tensor 100 MB; on the 2-core CPU this was written on, ~100 GFLOP/s and ~40 ms to fault in
each fresh 100 MB):
    dense (the reference): 5 such matmuls (encoder, decoder, g D, g_pre^T x, c^T g; a 6th for dx), and c, the
        relu mask, g D and g_pre as fresh (N, n) tensors: ~190 GFLOP and ~0.5 GB of (N, n) traffic, ~2 s.
    here: the encoder matmul (38.7 GFLOP, ~0.4 s), topk's read of pre, c written over pre's buffer (no new
        (N, n) tensor), then 4 passes (5 with dx) over nnz = 65,536 pairs of d = 768: 50 M multiply-adds each,
        0.4 GFLOP in all; and D^T, dD^T, dW_enc and dW_dec, 37 MB each. Alternatives measured on the same CPU
        (fastest of repeated runs, other jobs running): for dW_enc, index_add of the nnz outer products g_pre_ij
        x_i (an nnz x d = 200 MB intermediate) 195 ms, a CSR sparse.mm 55 ms, embedding_bag on the element-sorted
        pattern 24 ms; for the SDDMM, gathering D's rows and a bmm 136 ms, sampled_addmm on the CSR pattern
        14 ms, on the CSC one 2 to 10 ms.
The decoder weight is (d, n), its rows the input dimensions, as nn.Linear stores it: D^T and dW_dec each cost a
transposing copy (~25 ms each here). With W_dec stored column-major (W_dec.t() contiguous), D^T is a straight
copy and dW_dec a view in W_dec's own layout; both layouts work.

ReLU pays only while few codes fire: per active pair the sparse path gathers ~6 rows of d, where a dense matmul
spends ~10 d FLOPs on every pair, active or not. On a CPU the two cross near a density of 1/5 (BENCHMARKS.md), so
the dispatch in sae.py measures a sample of tokens and takes the sparse path up to SPARSE_MAX_DENSITY = 1/8 (with a
margin: a faster BLAS moves the crossing down). TopK and BatchTopK always take the sparse path. `python bench.py
--peers` times a whole TopK training step against SAELens and sparsify.

Checked against sae.sae_forward_torch by `python -m pytest tests/test_sparse_sae.py`.
"""

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .backend import autocast_dtype

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# On a CPU, ReLU takes the sparse path when at most this share of the codes fires (measured on 2 cores; see above).
SPARSE_MAX_DENSITY = 1 / 8


def check_sae_inputs(x, enc_weight, enc_bias, dec_weight, dec_bias, dtypes):
    """(n_dict, d) of an SAE's tensors, after checking that their shapes fit and that they share a dtype of dtypes
    and a device."""
    n_dict, d = enc_weight.shape
    tensors = (x, enc_weight, enc_bias, dec_weight, dec_bias)
    assert x.shape[-1] == d and dec_weight.shape == (d, n_dict) and enc_bias.shape == (n_dict,) \
        and dec_bias.shape == (d,), f"shapes {[tuple(t.shape) for t in tensors]}"
    assert len({t.dtype for t in tensors}) == 1 and x.dtype in dtypes, \
        f"all inputs must share one of {dtypes}, got {[t.dtype for t in tensors]}"
    assert len({t.device for t in tensors}) == 1, "all inputs must be on one device"
    return n_dict, d


def check_k(k, n_dict: int):
    """k is None (the ReLU code) or TopK's number of codes per token, an int from 1 to n_dict; else ValueError."""
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_dict):
        raise ValueError(f"k={k!r}: TopK needs k, the codes it keeps per token, an int from 1 to n_dict={n_dict} "
                         "(or None for the ReLU code)")


# ----------------------------------------------------------------------------------------------------------
# Patterns: the selected pairs in CSR form, row_ptr (N + 1,) and col (nnz,) int64, with their pre-activations


def pattern_rows(row_ptr: torch.Tensor, nnz: int) -> torch.Tensor:
    """(nnz,) the token of each pair of a CSR pattern."""
    tokens = torch.arange(row_ptr.numel() - 1, device=row_ptr.device)
    return tokens.repeat_interleave(row_ptr.diff(), output_size=nnz)


def sort_indices(keys: torch.Tensor):
    """torch.sort(keys, stable=True) of (nnz,) int64 keys, as one row of a 2-D tensor: PyTorch sorts that on one
    thread, where a 1-D integer tensor gets a parallel radix sort whose passes each wait for every thread (on 2
    shared cores: 0.3 ms idle, 180 ms when another job held a core; this way 3 to 25 ms)."""
    values, order = torch.sort(keys.view(1, -1), dim=1, stable=True)
    return values.view(-1), order.view(-1)


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
    total = N * k
    m = min(n, 2 * k)
    values, cols = pre.topk(m, dim=1, sorted=False)  # (N, m) candidates
    cand_value, cand_col = values.reshape(-1), cols.reshape(-1)
    cand_row = torch.arange(N, device=pre.device).repeat_interleave(m)
    floor, width = values.amin(1), torch.full((N,), m, device=pre.device)  # each row's m-th largest, and m
    while True:
        top_value, top = cand_value.topk(total, sorted=False)  # (N k,) positions among the candidates
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
    """Every positive pre-activation, ordered by (token, element)."""
    flat = (pre > 0).view(-1).nonzero().squeeze(1)  # (nnz,) positions in the flattened (N, n)
    n = pre.shape[1]
    row_ptr = F.pad(torch.bincount(flat // n, minlength=pre.shape[0]).cumsum(0), (1, 0))
    return row_ptr, flat % n, pre.view(-1)[flat]


def relu_density(x, enc_weight, enc_bias, tokens: int = 64) -> float:
    """The share of ReLU's codes that fire on about `tokens` tokens spread through x: one small matmul, one sync."""
    x2 = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        pre = F.linear(x2[:: max(1, x2.shape[0] // tokens)], enc_weight, enc_bias)  # (~tokens, n)
        return (pre > 0).float().mean().item()


def by_element(row_ptr, col, n_dict: int):
    """The CSR pattern sorted by element (CSC): col_ptr (n + 1,), and per pair its element, its token and its
    place in the CSR order (each (nnz,)). The sort is stable: a fixed summation order, deterministic."""
    col_sorted, order = sort_indices(col)
    col_ptr = F.pad(torch.bincount(col_sorted, minlength=n_dict).cumsum(0), (1, 0))
    return col_ptr, col_sorted, pattern_rows(row_ptr, col.numel())[order], order


# ----------------------------------------------------------------------------------------------------------
# Products over a pattern


def gather_sum(ptr, idx, weight, table) -> torch.Tensor:
    """out[b] = sum over e in [ptr[b], ptr[b + 1]) of weight[e] table[idx[e]]: (len(ptr) - 1, d)."""
    return F.embedding_bag(idx, table.contiguous(), ptr, mode="sum", per_sample_weights=weight,
                           include_last_offset=True)


def sampled_dots(ptr, idx, left, right) -> torch.Tensor:
    """(nnz,) left[b] . right[idx[e]] for each e in [ptr[b], ptr[b + 1]): left (B, d), right (M, d)."""
    with warnings.catch_warnings():  # the CSR tensor only carries the pattern; its "beta" notice is noise here
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        mask = torch.sparse_csr_tensor(ptr, idx, left.new_zeros(idx.numel()), (left.shape[0], right.shape[0]),
                                       check_invariants=False)
    return torch.sparse.sampled_addmm(mask, left, right.t(), beta=0).values()


# ----------------------------------------------------------------------------------------------------------
# Autograd


class SAEForwardSparse(torch.autograd.Function):
    """(x_hat, row_ptr, col, value, c or None) of the SAE, computed over the selected pairs (see the docstring).

    select: "topk", "batch_topk" (k per token, over each token or over the batch) or "relu" (k None).
    dense: also return c (N, n), written over the pre-activations' buffer. Gradients arrive through x_hat, value
    and c; the compute dtype is fp32 (fp64 for fp64 inputs), the outputs and gradients are in the inputs' dtype.
    """

    @staticmethod
    def forward(ctx, x, enc_weight, enc_bias, dec_weight, dec_bias, select, k, dense):
        n_dict, d = check_sae_inputs(x, enc_weight, enc_bias, dec_weight, dec_bias, SUPPORTED_DTYPES)
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        x2 = x.reshape(-1, d).contiguous()  # (N, d)
        pre = torch.addmm(enc_bias, x2, enc_weight.t())  # (N, n), the one dense matmul
        if select == "topk":
            row_ptr, col, value = select_topk(pre, k)
        elif select == "batch_topk":
            row_ptr, col, value = select_batch_topk(pre, k)
        else:
            row_ptr, col, value = select_relu(pre)
        value = value.to(compute).relu_()  # (nnz,) the code at the selected pairs
        c = None
        if dense and select == "relu":
            c = pre.relu_()
        elif dense:  # pre is not needed any more: its buffer becomes c
            c = pre.view(-1).zero_().index_put_((pattern_rows(row_ptr, col.numel()) * n_dict + col,),
                                                value.to(pre.dtype)).view(pre.shape)
        del pre

        # (n, d) rows of D^T, contiguous: a transposing copy unless W_dec is stored column-major
        dictionary_t = dec_weight.t().to(compute, memory_format=torch.contiguous_format, copy=True)
        norms = torch.linalg.vector_norm(dictionary_t, dim=1)  # (n,) ||W_dec_j||
        dictionary_t.div_(norms[:, None])
        x_hat = gather_sum(row_ptr, col, value, dictionary_t).add_(dec_bias)  # (N, d)

        ctx.save_for_backward(x2, enc_weight, dictionary_t, norms, row_ptr, col, value)
        ctx.x_shape, ctx.column_major = x.shape, dec_weight.t().is_contiguous()
        ctx.mark_non_differentiable(row_ptr, col)
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not as zeros
        c = c.view(*x.shape[:-1], n_dict) if c is not None else None
        return x_hat.to(x.dtype).view(x.shape), row_ptr, col, value.to(x.dtype), c

    @staticmethod
    def backward(ctx, grad_x_hat, grad_row_ptr, grad_col, grad_value, grad_c):
        needs = ctx.needs_input_grad
        none = (None,) * 8
        if grad_x_hat is None and grad_value is None and grad_c is None:
            return none
        x2, enc_weight, dictionary_t, norms, row_ptr, col, value = ctx.saved_tensors
        (N, d), n_dict, compute = x2.shape, enc_weight.shape[0], dictionary_t.dtype
        g = grad_x_hat.reshape(N, d).to(compute).contiguous() if grad_x_hat is not None else None  # (N, d)

        col_ptr, csc_col, csc_rows, order = by_element(row_ptr, col, n_dict)
        value_csc = value[order]
        # g_pre on S, in CSC order: what dW_enc and db_enc sum over
        if g is not None:
            grad_pre = sampled_dots(col_ptr, csc_rows, dictionary_t, g)  # (nnz,) D_j . g_i
        else:
            grad_pre = torch.zeros_like(value_csc)
        if grad_value is not None:
            grad_pre += grad_value.to(compute)[order]
        if grad_c is not None:  # possibly expanded (c.sum()): read at the pairs only
            grad_pre += grad_c.reshape(N, n_dict)[csc_rows, csc_col].to(compute)
        grad_pre.masked_fill_(value_csc <= 0, 0)  # relu's gate

        grad_x = grad_enc_w = grad_enc_b = grad_dec_w = grad_dec_b = None
        if needs[0]:
            grad_pre_csr = torch.empty_like(grad_pre).index_copy_(0, order, grad_pre)
            grad_x = gather_sum(row_ptr, col, grad_pre_csr, enc_weight.to(compute)).to(x2.dtype).view(ctx.x_shape)
        if needs[1]:
            grad_enc_w = gather_sum(col_ptr, csc_rows, grad_pre, x2.to(compute)).to(enc_weight.dtype)  # (n, d)
        if needs[2]:
            grad_enc_b = torch.zeros(n_dict, dtype=compute, device=x2.device).index_add_(0, csc_col, grad_pre)
            grad_enc_b = grad_enc_b.to(enc_weight.dtype)
        if g is not None and needs[3]:
            grad_dict_t = gather_sum(col_ptr, csc_rows, value_csc, g)  # (n, d) = C^T g, dL/dD^T
            radial = torch.einsum("nd,nd->n", dictionary_t, grad_dict_t)  # (n,) D_j . dD_j
            grad_dict_t.addcmul_(dictionary_t, radial[:, None], value=-1).div_(norms[:, None])
            # (d, n) in W_dec's layout: a transposing copy unless W_dec is stored column-major (then a view)
            layout = torch.preserve_format if ctx.column_major else torch.contiguous_format
            grad_dec_w = grad_dict_t.t().to(enc_weight.dtype, memory_format=layout)
        if g is not None and needs[4]:
            grad_dec_b = g.sum(0).to(enc_weight.dtype)
        return grad_x, grad_enc_w, grad_enc_b, grad_dec_w, grad_dec_b, None, None, None


# ----------------------------------------------------------------------------------------------------------
# What the rest of the code calls


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
        n_dict = self.shape[-1]
        c = self.value.new_zeros(self.shape.numel())
        return c.index_put((self.rows() * n_dict + self.col,), self.value).view(self.shape)


def sae_forward_sparse(x, enc_weight, enc_bias, dec_weight, dec_bias, k=None, batch_topk=False, dense=False):
    """The SAE on x (..., d_in) over its selected pairs: (x_hat (..., d_in), SparseCode). On every device.

    k=None: the ReLU code (every positive pre-activation); k an int: TopK, each token's k largest pre-activations
    through relu; with batch_topk=True, BatchTopK's training code: the batch's N k largest (N tokens), k per token
    on average. dense=True also makes the dense c, SparseCode.dense, over the pre-activations' buffer (no extra
    (N, n_dict) tensor). Gradients flow from x_hat and from the code's values (or c) to every input. Under
    autocast the inputs are cast to the autocast dtype first.
    """
    check_k(k, enc_weight.shape[0])
    if batch_topk and k is None:
        raise ValueError("batch_topk=True selects k codes per token on average over the batch: give k")
    dtype = autocast_dtype(x.device)
    tensors = (x, enc_weight, enc_bias, dec_weight, dec_bias)
    if dtype is not None:  # what autocast would do to the matmuls, done once for every product
        tensors = tuple(t.to(dtype) for t in tensors)
    select = "relu" if k is None else ("batch_topk" if batch_topk else "topk")
    with torch.autocast(x.device.type, enabled=False):
        x_hat, row_ptr, col, value, c = SAEForwardSparse.apply(*tensors, select, k, dense)
    return x_hat, SparseCode(row_ptr, col, value, torch.Size((*x.shape[:-1], enc_weight.shape[0])), c)
