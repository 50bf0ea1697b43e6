"""KL divergence between two models' next-token distributions, fused (Triton) and chunked through lm_head.

The e2e SAE loss compares the spliced model's logits z with the original model's logits y, per token (row):

    KL(p_orig || p_new) = sum_v p_orig[v] (log p_orig[v] - log p_new[v]),   p = softmax(logits)
                        = sum_v p_orig[v] (y[v] - z[v]) + lse(z) - lse(y),    lse = log-sum-exp over v
    d KL / d z[v]       = p_new[v] - p_orig[v]

averaged over rows, exactly `F.kl_div(log_softmax(z), log_softmax(y), log_target=True, reduction="batchmean")`.
The original logits are a constant target: no gradient flows into them (nor, below, into h_orig or weight).

One pass per row suffices for the loss: keep running maxima m_z, m_y, running sums s_z = sum exp(z - m_z),
s_y = sum exp(y - m_y) and a = sum exp(y - m_y)(y - z), rescaling all three when a maximum grows (the online
softmax trick); then lse = m + log s and KL = a / s_y + lse(z) - lse(y). Everything is in fp32 registers,
so logits of magnitude 1e4 or one-hot-peaked rows neither overflow nor lose the answer; only two fp32
numbers per row (the lse's) are kept for the gradient pass.

Memory traffic for R rows x V vocab, b bytes per logit (paper: R = 8,192, V = 50,257, so one pass over a
(R, V) bf16 tensor is 823 MB):
    eager: log_softmax twice (read 2, write 2), the pointwise KL (read 2, write 1), the sum (read 1), and in
           backward about as much again: ~15 passes, and 3-4 (R, V) temporaries alive at the peak (fp32 ones
           under autocast, which runs log_softmax in fp32).
    fused: forward reads z and y once (2 passes); backward reads them again and writes the gradient (3 passes).
           No (R, V) temporary except the gradient autograd asks for.
It is memory bound (a few FLOPs per logit), so time follows the bytes: ~5 passes instead of ~15.

`linear_kl_div` goes one step further for the end of the network, where the logits come from the frozen,
tied lm_head W (V, d): logits = h @ W^T. It never builds the (R, V) logits of either model. It walks over
chunks of C rows; per chunk it computes both chunks of logits with matmuls, runs the fused kernel, which
writes d KL / d z over the new logits in place (scaled by 1/R), and turns that into grad_h = grad_z @ W.
The gradient is therefore ready when the forward pass ends and backward only multiplies it by the scalar
grad_output. Matmul FLOPs are the eager ones (2 R d V for each logits matmul, 2 R d V for grad_h); memory
is 2 C V b for one chunk's logits plus R d for grad_h, instead of several (R, V) tensors.

Checked against kl_div_torch by `python -m pytest tests/test_kernels.py`; timed by `python bench.py`.
"""

import torch
import torch.nn.functional as F

from .backend import autocast_dtype, tl, triton, tuning_configs, use_triton

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# linear_kl_div's default chunk: rows whose logits hold about 2^25 values per model (64 MB each in bf16).
LOGITS_PER_CHUNK = 2**25
# On a CPU smaller chunks stay in the allocator's cache: buffers above ~32 MB are mmapped and page-faulted afresh
# on every use, which made an e2e step of the embedded default about twice as slow.
CPU_LOGITS_PER_CHUNK = 2**22


# ----------------------------------------------------------------------------------------------------------
# Reference


def kl_div_torch(new_logits: torch.Tensor, orig_logits: torch.Tensor) -> torch.Tensor:
    """The definition: KL(p_orig || p_new) per row of (..., vocab) logits, averaged over rows."""
    vocab = new_logits.shape[-1]
    new = new_logits.reshape(-1, vocab)  # (R, V)
    orig = orig_logits.detach().reshape(-1, vocab)  # (R, V)
    return F.kl_div(F.log_softmax(new, -1), F.log_softmax(orig, -1), log_target=True, reduction="batchmean")


def kl_and_grad_torch(new_logits: torch.Tensor, orig_logits: torch.Tensor, grad_scale: float):
    """Per-row KL of (C, V) logits and grad_scale x its gradient w.r.t. new_logits, in new_logits' dtype."""
    logp_new = F.log_softmax(new_logits.float(), -1)  # (C, V)
    logp_orig = F.log_softmax(orig_logits.float(), -1)  # (C, V)
    p_orig = logp_orig.exp()
    kl_rows = (p_orig * (logp_orig - logp_new)).sum(-1)  # (C,)
    grad = (logp_new.exp() - p_orig) * grad_scale  # (C, V)
    return kl_rows, grad.to(new_logits.dtype)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels: one program per row, sweeping the vocabulary in BLOCK_V-wide blocks.

_KL_CONFIGS = [triton.Config({"BLOCK_V": 4096}, num_warps=8),
               triton.Config({"BLOCK_V": 2048}, num_warps=8),
               triton.Config({"BLOCK_V": 8192}, num_warps=16),
               triton.Config({"BLOCK_V": 1024}, num_warps=4)]
_KL_INTERPRETER_CONFIG = triton.Config({"BLOCK_V": 128})


@triton.jit
def _kl_grad_row(new_row,  # pointer to this row's new logits z
                 orig_row,  # pointer to this row's original logits y
                 grad_row,  # pointer to this row's gradient output (may equal new_row: written in place)
                 lse_new,  # fp32 log-sum-exp of z
                 lse_orig,  # fp32 log-sum-exp of y
                 scale,  # fp32 factor applied to p_new - p_orig (grad_output / R)
                 vocab,  # V
                 BLOCK_V: tl.constexpr):  # vocabulary entries per block
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < vocab
        z = tl.load(new_row + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(orig_row + cols, mask=mask, other=0.0).to(tl.float32)
        grad = (tl.exp(z - lse_new) - tl.exp(y - lse_orig)) * scale
        tl.store(grad_row + cols, grad.to(grad_row.dtype.element_ty), mask=mask)


@triton.autotune(configs=tuning_configs(_KL_CONFIGS, _KL_INTERPRETER_CONFIG), key=["vocab", "WRITE_GRAD"],
                 restore_value=["new_ptr"])  # autotuning reruns the kernel: undo its in-place gradient
@triton.jit
def _kl_forward_kernel(new_ptr,  # (R, V) new logits z; overwritten by the scaled gradient if WRITE_GRAD
                       orig_ptr,  # (R, V) original logits y
                       kl_ptr,  # (R,) fp32 out: KL of each row
                       lse_new_ptr,  # (R,) fp32 out: lse(z), for the gradient pass
                       lse_orig_ptr,  # (R,) fp32 out: lse(y)
                       grad_scale,  # fp32, used if WRITE_GRAD: the gradient is grad_scale * (p_new - p_orig)
                       vocab,  # V
                       stride_new,  # elements between rows of z (the vocab dimension is contiguous)
                       stride_orig,  # elements between rows of y
                       WRITE_GRAD: tl.constexpr,  # also write d KL / d z over z (linear_kl_div)
                       BLOCK_V: tl.constexpr):  # vocabulary entries per block
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2^31 for long batches
    new_row = new_ptr + row * stride_new
    orig_row = orig_ptr + row * stride_orig
    # Running maxima, sums of exponentials and sum exp(y - m_y) (y - z): the first block makes them finite.
    m_new = -float("inf")
    m_orig = -float("inf")
    s_new = 0.0
    s_orig = 0.0
    acc = 0.0
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < vocab
        z = tl.load(new_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
        y = tl.load(orig_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
        m_new_next = tl.maximum(m_new, tl.max(z, axis=0))
        m_orig_next = tl.maximum(m_orig, tl.max(y, axis=0))
        s_new = s_new * tl.exp(m_new - m_new_next) + tl.sum(tl.exp(z - m_new_next), axis=0)
        alpha = tl.exp(m_orig - m_orig_next)
        e_orig = tl.exp(y - m_orig_next)
        s_orig = s_orig * alpha + tl.sum(e_orig, axis=0)
        # Entries with p_orig = 0 (and the padding past V) add nothing, not 0 * (-inf - -inf) = nan.
        y_minus_z = tl.where(mask, y, 0.0) - tl.where(mask, z, 0.0)
        acc = acc * alpha + tl.sum(tl.where(e_orig > 0, e_orig * y_minus_z, 0.0), axis=0)
        m_new = m_new_next
        m_orig = m_orig_next
    lse_new = m_new + tl.log(s_new)
    lse_orig = m_orig + tl.log(s_orig)
    tl.store(kl_ptr + row, acc / s_orig + lse_new - lse_orig)
    tl.store(lse_new_ptr + row, lse_new)
    tl.store(lse_orig_ptr + row, lse_orig)
    if WRITE_GRAD:
        _kl_grad_row(new_row, orig_row, new_row, lse_new, lse_orig, grad_scale, vocab, BLOCK_V)


@triton.autotune(configs=tuning_configs(_KL_CONFIGS, _KL_INTERPRETER_CONFIG), key=["vocab"])
@triton.jit
def _kl_backward_kernel(new_ptr,  # (R, V) new logits z
                        orig_ptr,  # (R, V) original logits y
                        grad_ptr,  # (R, V) out, contiguous: grad_output / R * (p_new - p_orig)
                        lse_new_ptr,  # (R,) fp32 lse(z) from the forward kernel
                        lse_orig_ptr,  # (R,) fp32 lse(y)
                        grad_output_ptr,  # scalar: d loss / d (mean KL)
                        inv_rows,  # fp32 1 / R (the batchmean)
                        vocab,  # V
                        stride_new,  # elements between rows of z
                        stride_orig,  # elements between rows of y
                        BLOCK_V: tl.constexpr):  # vocabulary entries per block
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(grad_output_ptr).to(tl.float32) * inv_rows  # read on the device: no host sync
    _kl_grad_row(new_ptr + row * stride_new, orig_ptr + row * stride_orig, grad_ptr + row * vocab,
                 tl.load(lse_new_ptr + row), tl.load(lse_orig_ptr + row), scale, vocab, BLOCK_V)


# ----------------------------------------------------------------------------------------------------------
# Launchers


def _check_logits(new: torch.Tensor, orig: torch.Tensor):
    assert new.dim() == 2 and new.shape == orig.shape, f"want two (rows, vocab) tensors, got {new.shape} {orig.shape}"
    assert new.dtype in SUPPORTED_DTYPES and orig.dtype in SUPPORTED_DTYPES, f"dtypes {new.dtype} {orig.dtype}"
    assert new.device == orig.device, f"logits on {new.device} and {orig.device}"
    assert new.stride(1) == 1 and orig.stride(1) == 1, "the vocabulary dimension must be contiguous"


def kl_forward_triton(new: torch.Tensor, orig: torch.Tensor, grad_scale: float | None = None):
    """Per-row KL and lse's of (R, V) logits. With grad_scale, also overwrite `new` with grad_scale x d KL/d new."""
    _check_logits(new, orig)
    rows, vocab = new.shape
    kl_rows, lse_new, lse_orig = (torch.empty(rows, device=new.device, dtype=torch.float32) for _ in range(3))
    write_grad = grad_scale is not None
    _kl_forward_kernel[(rows,)](new, orig, kl_rows, lse_new, lse_orig, float(grad_scale or 0.0), vocab,
                                new.stride(0), orig.stride(0), WRITE_GRAD=write_grad)
    return kl_rows, lse_new, lse_orig


def kl_backward_triton(new, orig, lse_new, lse_orig, grad_output: torch.Tensor) -> torch.Tensor:
    """grad_output / R * (p_new - p_orig) as a fresh (R, V) tensor in new's dtype."""
    _check_logits(new, orig)
    assert grad_output.numel() == 1, "the KL is a scalar, so its grad_output must be one too"
    rows, vocab = new.shape
    grad = torch.empty((rows, vocab), device=new.device, dtype=new.dtype)
    grad_output = grad_output.reshape(1).float()
    _kl_backward_kernel[(rows,)](new, orig, grad, lse_new, lse_orig, grad_output, 1.0 / rows, vocab,
                                 new.stride(0), orig.stride(0))
    return grad


def kl_and_grad_triton(new_logits: torch.Tensor, orig_logits: torch.Tensor, grad_scale: float):
    """Same contract as kl_and_grad_torch, but the gradient is written over new_logits (returned)."""
    kl_rows, _, _ = kl_forward_triton(new_logits, orig_logits, grad_scale=grad_scale)
    return kl_rows, new_logits


# ----------------------------------------------------------------------------------------------------------
# Autograd


class KLDivTriton(torch.autograd.Function):
    """Mean over rows of KL(p_orig || p_new); gradient for new_logits only."""

    @staticmethod
    def forward(ctx, new_logits, orig_logits):
        vocab = new_logits.shape[-1]
        new = new_logits.reshape(-1, vocab)  # (R, V), a view when the input is contiguous
        orig = orig_logits.reshape(-1, vocab)  # (R, V)
        kl_rows, lse_new, lse_orig = kl_forward_triton(new, orig)
        ctx.save_for_backward(new, orig, lse_new, lse_orig)
        ctx.input_shape = new_logits.shape
        return kl_rows.mean()

    @staticmethod
    def backward(ctx, grad_output):
        new, orig, lse_new, lse_orig = ctx.saved_tensors
        grad = kl_backward_triton(new, orig, lse_new, lse_orig, grad_output)
        return grad.view(ctx.input_shape), None


class ChunkedLinearKL(torch.autograd.Function):
    """Mean KL of cap(h_new @ W^T) + b against cap(h_orig @ W^T) + b, chunk by chunk; gradient for h_new only.
    cap(z) = s tanh(z / s) where a soft cap s is given (Gemma 2's), z itself otherwise; its derivative, 1 - tanh^2,
    multiplies the gradient of the capped logits.

    kl_and_grad(new_logits, orig_logits, grad_scale) -> (kl_rows, grad_scale * dKL/dnew_logits) is either
    the Triton kernel (which writes the gradient over the new logits) or the PyTorch reference.
    """

    @staticmethod
    def forward(ctx, h_new, h_orig, weight, bias, softcap, chunk_rows, kl_and_grad):
        d = h_new.shape[-1]
        h_new2, h_orig2 = h_new.reshape(-1, d), h_orig.reshape(-1, d)  # (R, d)
        rows = h_new2.shape[0]
        grad_h = torch.empty_like(h_new2)  # (R, d)
        kl_sum = torch.zeros((), device=h_new.device, dtype=torch.float32)

        def logits(h):  # (C, V), and the cap's tanh where there is one
            z = h @ weight.t() if bias is None or softcap is not None else torch.addmm(bias, h, weight.t())
            if softcap is None:
                return z, None
            tanh = torch.tanh(z / softcap)
            return softcap * tanh + (bias if bias is not None else 0), tanh

        for start in range(0, rows, chunk_rows):
            chunk = slice(start, start + chunk_rows)
            new_logits, tanh = logits(h_new2[chunk])
            orig_logits, _ = logits(h_orig2[chunk])
            kl_rows, grad_logits = kl_and_grad(new_logits, orig_logits, 1.0 / rows)
            del orig_logits
            kl_sum += kl_rows.sum()
            if tanh is not None:  # through the cap: d (s tanh(z / s)) / dz = 1 - tanh^2
                grad_logits = grad_logits * (1 - tanh * tanh)
            torch.matmul(grad_logits, weight, out=grad_h[chunk])  # (C, V) @ (V, d) -> (C, d)
        # A gradient computed in forward is the right one only for this scalar: backward checks that.
        ctx.save_for_backward(grad_h.view(h_new.shape))
        return kl_sum / rows

    @staticmethod
    def backward(ctx, grad_output):
        assert grad_output.numel() == 1, "linear_kl_div precomputes its gradient, valid for a scalar loss only"
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_output.to(grad_h.dtype), None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------
# What the rest of the code calls


def kl_div(new_logits: torch.Tensor, orig_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_orig || p_new) per row of (..., vocab) logits, averaged over rows (F.kl_div's "batchmean").

    Differentiable in new_logits only; orig_logits is a constant target. The Triton path returns fp32.
    """
    assert new_logits.shape == orig_logits.shape, f"logits {new_logits.shape} vs {orig_logits.shape}"
    if use_triton(new_logits, orig_logits):
        return KLDivTriton.apply(new_logits, orig_logits.detach())
    return kl_div_torch(new_logits, orig_logits)


def linear_kl_div(h_new: torch.Tensor, h_orig: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  softcap: float | None = None, chunk_rows: int | None = None) -> torch.Tensor:
    """kl_div(cap(h_new @ weight.T) + bias, cap(h_orig @ weight.T) + bias) without ever holding either model's full
    logits; cap(z) = softcap * tanh(z / softcap), or z without a softcap.

    h_new, h_orig: (..., d) final (normed) hidden states; weight: (vocab, d), the frozen lm_head; bias: (vocab,) or
    None (an lm_head's bias, or model.Unembedding's log multiplicities). Differentiable in h_new only (h_orig,
    weight and bias are treated as constants). chunk_rows defaults to LOGITS_PER_CHUNK // vocab rows
    (CPU_LOGITS_PER_CHUNK on a CPU; at least 16). Under autocast, the matmuls run in the autocast dtype.
    """
    assert h_new.shape == h_orig.shape and h_new.shape[-1] == weight.shape[-1] and weight.dim() == 2, \
        f"h_new {h_new.shape}, h_orig {h_orig.shape}, weight {weight.shape}"
    assert bias is None or bias.shape == weight.shape[:1], f"bias {bias.shape} for weight {weight.shape}"
    if chunk_rows is None:
        per_chunk = LOGITS_PER_CHUNK if h_new.is_cuda else CPU_LOGITS_PER_CHUNK
        chunk_rows = max(16, per_chunk // weight.shape[0] // 16 * 16)
    kl_and_grad = kl_and_grad_triton if use_triton(h_new, h_orig, weight) else kl_and_grad_torch
    h_orig, weight = h_orig.detach(), weight.detach()
    bias = bias.detach().to(weight.dtype) if bias is not None else None
    dtype = autocast_dtype(h_new.device)
    if dtype is not None:  # do what autocast would do to the matmuls, once, outside the chunk loop
        h_new, h_orig, weight = h_new.to(dtype), h_orig.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(h_new.device.type, enabled=False):
        return ChunkedLinearKL.apply(h_new, h_orig, weight, bias, softcap, chunk_rows, kl_and_grad)
