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
so logits of magnitude 1e4 or one-hot-peaked rows neither overflow nor lose the answer. A second sweep of the
row, in the same program, writes the gradient times a given scale: the loss is a scalar, so its gradient is known
when the forward pass ends, and backward only multiplies it by grad_output. kl_div writes it into a fresh tensor,
the one autograd asks for, and makes no other (R, V) tensor, where eager PyTorch makes several (BENCHMARKS.md
counts the passes of each); the loss is memory bound, so time follows the bytes.

`linear_kl_div` goes one step further at the end of the network, where the logits come from the frozen, tied
lm_head W (V, d): logits = h @ W^T. It never builds either model's (R, V) logits: per chunk of C rows it computes
both models' logits with matmuls, runs the fused kernel, which writes d KL / d z over the new logits in place
(scaled by 1/R), and turns that into grad_h = grad_z @ W for backward to scale. The matmuls are the eager ones
(2 R d V FLOPs each); the memory is one chunk's logits (2 C V b bytes) and grad_h (R, d), not several (R, V) tensors.

Checked against kl_div_torch by `python -m pytest tests/test_kernels.py`; timed by `python bench.py`.
"""

import torch
import torch.nn.functional as F

from .backend import SUPPORTED_DTYPES, autocast_inputs, tl, triton, tuning_configs, use_triton

LOGITS_PER_CHUNK = 2**25  # linear_kl_div's default chunk: rows whose logits hold about this many values per model
CPU_LOGITS_PER_CHUNK = 2**22  # on a CPU: larger chunks are mmapped, faulted in on every use, not cached (BENCHMARKS.md)


# ---- reference ----

def kl_div_torch(new_logits: torch.Tensor, orig_logits: torch.Tensor) -> torch.Tensor:
    """The definition: KL(p_orig || p_new) per row of (..., vocab) logits, averaged over rows."""
    vocab = new_logits.shape[-1]
    new, orig = new_logits.reshape(-1, vocab), orig_logits.detach().reshape(-1, vocab)  # (R, V) each
    return F.kl_div(F.log_softmax(new, -1), F.log_softmax(orig, -1), log_target=True, reduction="batchmean")


def kl_and_grad_torch(new_logits: torch.Tensor, orig_logits: torch.Tensor, grad_scale: float = 1.0, out=None):
    """(per-row KL of (C, V) logits, out): where out is given, grad_scale x the KL's gradient w.r.t. new_logits is
    written into it (it may be new_logits itself)."""
    logp_new = F.log_softmax(new_logits.float(), -1)  # (C, V)
    logp_orig = F.log_softmax(orig_logits.float(), -1)  # (C, V)
    p_orig = logp_orig.exp()
    kl_rows = (p_orig * (logp_orig - logp_new)).sum(-1)  # (C,)
    if out is not None:
        out.copy_((logp_new.exp() - p_orig) * grad_scale)
    return kl_rows, out


# ---- the Triton kernel (one program per row, BLOCK_V-wide blocks of the vocabulary) and its launcher ----

_KL_CONFIGS = [triton.Config({"BLOCK_V": 4096}, num_warps=8),
               triton.Config({"BLOCK_V": 2048}, num_warps=8),
               triton.Config({"BLOCK_V": 8192}, num_warps=16),
               triton.Config({"BLOCK_V": 1024}, num_warps=4)]
_KL_INTERPRETER_CONFIG = triton.Config({"BLOCK_V": 128})


@triton.autotune(configs=tuning_configs(_KL_CONFIGS, _KL_INTERPRETER_CONFIG), key=["vocab", "WRITE_GRAD"],
                 restore_value=["new_ptr"])  # autotuning reruns the kernel: undo its in-place gradient
@triton.jit
def _kl_forward_kernel(new_ptr,  # (R, V) new logits z
                       orig_ptr,  # (R, V) original logits y
                       grad_ptr,  # (R, V) out if WRITE_GRAD: grad_scale * (p_new - p_orig); may be new_ptr (in place)
                       kl_ptr,  # (R,) fp32 out: KL of each row
                       grad_scale,  # fp32, used if WRITE_GRAD
                       vocab,  # V
                       stride_new,  # elements between rows of z (the vocab dimension is contiguous, in all three)
                       stride_orig,  # elements between rows of y
                       stride_grad,  # elements between rows of the gradient
                       WRITE_GRAD: tl.constexpr,  # also write d KL / d z
                       BLOCK_V: tl.constexpr):  # vocabulary entries per block
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2^31 for long batches
    new_row = new_ptr + row * stride_new
    orig_row = orig_ptr + row * stride_orig
    # Running maxima, sums of exponentials and sum exp(y - m_y) (y - z): the first block makes them finite.
    m_new, m_orig = -float("inf"), -float("inf")
    s_new, s_orig, acc = 0.0, 0.0, 0.0
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
        m_new, m_orig = m_new_next, m_orig_next
    lse_new = m_new + tl.log(s_new)
    lse_orig = m_orig + tl.log(s_orig)
    tl.store(kl_ptr + row, acc / s_orig + lse_new - lse_orig)
    if WRITE_GRAD:  # grad_scale * (p_new - p_orig): a second sweep of the row
        grad_row = grad_ptr + row * stride_grad
        for start in range(0, vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < vocab
            z = tl.load(new_row + cols, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(orig_row + cols, mask=mask, other=0.0).to(tl.float32)
            grad = (tl.exp(z - lse_new) - tl.exp(y - lse_orig)) * grad_scale
            tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def kl_and_grad_triton(new_logits: torch.Tensor, orig_logits: torch.Tensor, grad_scale: float = 1.0, out=None):
    """kl_and_grad_torch by _kl_forward_kernel, for (R, V) logits."""
    grad = new_logits if out is None else out  # never written without out: a valid pointer
    logits = (new_logits, orig_logits, grad)
    assert new_logits.shape == orig_logits.shape == grad.shape, f"shapes {[tuple(t.shape) for t in logits]}"
    assert all(t.dtype in SUPPORTED_DTYPES and t.device == grad.device and t.stride(1) == 1 for t in logits), \
        f"want the kernels' dtypes, one device, a contiguous vocabulary: {[(t.dtype, t.device) for t in logits]}"
    rows, vocab = new_logits.shape
    kl_rows = torch.empty(rows, device=new_logits.device, dtype=torch.float32)
    _kl_forward_kernel[(rows,)](new_logits, orig_logits, grad, kl_rows, float(grad_scale), vocab, new_logits.stride(0),
                                orig_logits.stride(0), grad.stride(0), WRITE_GRAD=out is not None)
    return kl_rows, out


# ---- autograd ----

class PrecomputedGrad(torch.autograd.Function):
    """A scalar loss of x computed with its gradient, loss_and_grad(x) -> (loss, d loss / d x): backward only
    multiplies that by grad_output. Differentiable in x only."""

    @staticmethod
    def forward(ctx, x, loss_and_grad):
        loss, ctx.grad = loss_and_grad(x)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        return ctx.grad * grad_output.to(ctx.grad.dtype), None


def linear_kl_and_grad(h_new, h_orig, weight, bias, softcap, chunk_rows, kl_and_grad):
    """linear_kl_div's loss and its gradient for h_new, chunk by chunk, with kl_and_grad (_triton or _torch)."""
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
        kl_rows, grad_logits = kl_and_grad(new_logits, orig_logits, 1.0 / rows, out=new_logits)  # in place
        del orig_logits
        kl_sum += kl_rows.sum()
        if tanh is not None:  # through the cap: d (s tanh(z / s)) / dz = 1 - tanh^2
            grad_logits = grad_logits * (1 - tanh * tanh)
        torch.matmul(grad_logits, weight, out=grad_h[chunk])  # (C, V) @ (V, d) -> (C, d)
    return kl_sum / rows, grad_h.view(h_new.shape)


# ---- what the rest of the code calls ----

def kl_div(new_logits: torch.Tensor, orig_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_orig || p_new) per row of (..., vocab) logits, averaged over rows (F.kl_div's "batchmean").
    Differentiable in new_logits only; orig_logits is a constant target. The Triton path returns fp32."""
    assert new_logits.shape == orig_logits.shape, f"logits {new_logits.shape} vs {orig_logits.shape}"
    if not use_triton(new_logits, orig_logits):
        return kl_div_torch(new_logits, orig_logits)
    vocab = new_logits.shape[-1]
    orig = orig_logits.detach().reshape(-1, vocab)  # (R, V)
    if not (torch.is_grad_enabled() and new_logits.requires_grad):  # the loss alone
        return kl_and_grad_triton(new_logits.reshape(-1, vocab), orig)[0].mean()

    def loss_and_grad(new):  # the gradient written into a fresh (R, V) tensor, the one autograd asks for
        new = new.reshape(-1, vocab)
        kl_rows, grad = kl_and_grad_triton(new, orig, 1.0 / new.shape[0], out=torch.empty_like(new))
        return kl_rows.mean(), grad.view(new_logits.shape)
    return PrecomputedGrad.apply(new_logits, loss_and_grad)


def linear_kl_div(h_new: torch.Tensor, h_orig: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  softcap: float | None = None, chunk_rows: int | None = None) -> torch.Tensor:
    """kl_div(cap(h_new @ weight.T) + bias, cap(h_orig @ weight.T) + bias) without ever holding either model's full
    logits; cap(z) = softcap * tanh(z / softcap) (Gemma 2's soft cap), or z without a softcap.

    h_new, h_orig: (..., d) final (normed) hidden states; weight: (vocab, d), the frozen lm_head; bias: (vocab,) or None
    (an lm_head's bias, or language_models.Unembedding's log multiplicities). Differentiable in h_new only. chunk_rows:
    by default LOGITS_PER_CHUNK // vocab (CPU_LOGITS_PER_CHUNK on a CPU), at least 16. Autocast sets the matmuls' dtype.
    """
    assert h_new.shape == h_orig.shape and h_new.shape[-1] == weight.shape[-1] and weight.dim() == 2, \
        f"h_new {h_new.shape}, h_orig {h_orig.shape}, weight {weight.shape}"
    assert bias is None or bias.shape == weight.shape[:1], f"bias {bias.shape} for weight {weight.shape}"
    if chunk_rows is None:
        per_chunk = LOGITS_PER_CHUNK if h_new.is_cuda else CPU_LOGITS_PER_CHUNK
        chunk_rows = max(16, per_chunk // weight.shape[0] // 16 * 16)
    kl_and_grad = kl_and_grad_triton if use_triton(h_new, h_orig, weight) else kl_and_grad_torch
    bias = bias.detach().to(weight.dtype) if bias is not None else None
    h_new, h_orig, weight, bias = autocast_inputs(h_new.device, h_new, h_orig.detach(), weight.detach(), bias)
    with torch.autocast(h_new.device.type, enabled=False):
        return PrecomputedGrad.apply(h_new, lambda h: linear_kl_and_grad(h, h_orig, weight, bias, softcap,
                                                                         chunk_rows, kl_and_grad))
