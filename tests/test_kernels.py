"""The Triton kernels against their PyTorch references: forward and every gradient, small odd shapes.

On a machine without a GPU the kernels run in Triton's interpreter (slow, so the shapes are tiny; the
interpreter uses small blocks, so they still span several blocks with a ragged last one). On a GPU the same
tests run compiled, and bf16 joins fp32 and fp16. References are computed in float64 from the same inputs.

    python -m pytest tests/test_kernels.py -q
"""
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede `import sae_kernels`: @triton.jit reads it
pytest.importorskip("triton")

import sae_kernels  # noqa: E402
from conftest import assert_close  # noqa: E402
from sae_kernels.kl import kl_div_torch  # noqa: E402
from sae_kernels.sae import sae_forward_torch  # noqa: E402

if not torch.cuda.is_available() and not sae_kernels.backend.INTERPRET:
    raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set (by another test module?), so its "
                       "kernels cannot run on this CPU: set it in tests/conftest.py, before anything imports triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# Allowed error relative to the largest magnitude of the reference value (fp16 / bf16 round every stored value).
TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def force_path(monkeypatch, path):
    """Set ReLU's density threshold on every device so that it takes `path`: "sparse" (the selected pairs), "dense"
    (the reference), or a threshold."""
    density = {"sparse": 1.0, "dense": 0.0}.get(path, path)
    for name in ("SPARSE_MAX_DENSITY", "CPU_SPARSE_MAX_DENSITY"):
        monkeypatch.setattr(sae_kernels.sae, name, density)


def path_of(output):
    """Which path computed an output of sae_forward: "triton" or "torch" (the SAE over its selected pairs, with that
    set of primitives: its backward's ctx.ops), or "reference" (sae_forward_torch, by autograd)."""
    return getattr(getattr(output.grad_fn, "ops", None), "name", "reference")


# ---------------------------------------------------------------------------------------------------------
# SAE


def sae_inputs(dtype, regime, shape=(37,), d_in=48, n_dict=80, seed=0):
    """x, enc_weight, enc_bias, dec_weight, dec_bias where ~7% ("sparse") or ~45% ("dense") of the codes fire,
    ("none") nothing fires; in every case token 5 fires nothing (x = 0 there and every encoder bias is < 0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, d_in, generator=g)
    x.view(-1, d_in)[5] = 0
    enc_weight = torch.randn(n_dict, d_in, generator=g) / d_in**0.5  # pre-activations ~ N(0, 1) + bias
    shift = {"sparse": 1.5, "dense": 0.05, "none": 100.0}[regime]
    enc_bias = -shift - 0.1 * torch.rand(n_dict, generator=g)
    dec_weight = torch.randn(d_in, n_dict, generator=g)
    dec_bias = torch.randn(d_in, generator=g)
    return [t.to(DEVICE, dtype) for t in (x, enc_weight, enc_bias, dec_weight, dec_bias)]


def sae_run(inputs, requires_grad, grads_of, reference, k=None):
    """Outputs and input gradients of one SAE call; grads_of(x_hat, c) -> ([outputs], [grad_outputs])."""
    leaves = [t.detach().clone().double() if reference else t.detach().clone() for t in inputs]
    for t, r in zip(leaves, requires_grad):
        t.requires_grad_(r)
    x_hat, c = (sae_forward_torch if reference else sae_kernels.sae_forward)(*leaves, k=k)
    outputs, grad_outputs = grads_of(x_hat, c)
    wrt = [t for t in leaves if t.requires_grad]
    grads = iter(torch.autograd.grad(outputs, wrt, [g.to(o.dtype) for o, g in zip(outputs, grad_outputs)],
                                     allow_unused=True))
    return x_hat, c, [next(grads) if t.requires_grad else None for t in leaves]


def check_sae(inputs, tol, requires_grad=(True,) * 5, grads_of=None, expect_sparse=None, k=None):
    if grads_of is None:  # random gradients for both outputs (c's stands in for a sparsity term)
        g = torch.Generator().manual_seed(1)
        x, n_dict = inputs[0], inputs[1].shape[0]
        g_x_hat = torch.randn(x.shape, generator=g).to(DEVICE)
        g_c = torch.randn(*x.shape[:-1], n_dict, generator=g).to(DEVICE)
        grads_of = lambda x_hat, c: ([x_hat, c], [g_x_hat, g_c])
    x_hat, c, grads = sae_run(inputs, requires_grad, grads_of, reference=False, k=k)
    ref_x_hat, ref_c, ref_grads = sae_run(inputs, requires_grad, grads_of, reference=True, k=k)
    if expect_sparse is not None:
        assert path_of(c) == ("triton" if expect_sparse else "reference")
    assert x_hat.dtype == c.dtype == inputs[0].dtype
    assert_close(x_hat, ref_x_hat, tol, "x_hat")
    assert_close(c, ref_c, tol, "c")
    for name, grad, ref in zip(["x", "enc_weight", "enc_bias", "dec_weight", "dec_bias"], grads, ref_grads):
        if ref is None:
            assert grad is None, f"d/d{name} should be None"
        else:
            assert_close(grad, ref, tol, f"d/d{name}")
    return c


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("regime", ["sparse", "dense"])
@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_sae_forward_and_gradients(dtype, regime, path, backend, monkeypatch):
    """Either path (forced through the density threshold) on sparse or dense codes, random grad_outputs."""
    backend("triton")
    force_path(monkeypatch, path)
    check_sae(sae_inputs(dtype, regime), TOL[dtype], expect_sparse=path == "sparse")


@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("case", ["x_hat only", "sparsity only", "frozen x"])
def test_sae_partial_gradients(case, path, backend, monkeypatch):
    """Unused outputs (their gradient is None), c.sum()'s expanded gradient, an input without grad."""
    backend("triton")
    force_path(monkeypatch, path)
    g = torch.Generator().manual_seed(2)
    g_x_hat = torch.randn(3, 7, 48, generator=g).to(DEVICE)
    grads_of, requires_grad = {
        "x_hat only": (lambda x_hat, c: ([x_hat], [g_x_hat]), (True,) * 5),
        "sparsity only": (lambda x_hat, c: ([0.37 * c.sum()], [torch.ones(())]), (True,) * 5),
        "frozen x": (lambda x_hat, c: ([x_hat, 0.37 * c.sum()], [g_x_hat, torch.ones(())]), (False,) + (True,) * 4),
    }[case]
    inputs = sae_inputs(torch.float32, "sparse", shape=(3, 7))
    check_sae(inputs, TOL[torch.float32], requires_grad, grads_of, expect_sparse=path == "sparse")


def test_sae_with_no_active_code_at_all(backend):
    backend("triton")
    inputs = sae_inputs(torch.float32, "none")
    check_sae(inputs, TOL[torch.float32], expect_sparse=True)


def test_sae_picks_its_path_from_the_measured_density(backend, monkeypatch):
    backend("triton")
    force_path(monkeypatch, 0.2)
    for regime, sparse in (("sparse", True), ("dense", False)):
        x_hat, c = sae_kernels.sae_forward(*[t.requires_grad_() for t in sae_inputs(torch.float32, regime)])
        density = (c > 0).float().mean().item()
        assert (density <= 0.2) == sparse, f"{regime}: density {density:.3f}"
        assert path_of(c) == path_of(x_hat) == ("triton" if sparse else "reference")


# ---------------------------------------------------------------------------------------------------------
# SAE with the TopK code

TOPK_D_IN, TOPK_N_DICT = 43, 83
# Rounding moves a pre-activation of these inputs by up to ~0.002 in fp16, ~0.015 in bf16: selections and relu's
# gate farther apart than this are the same in every dtype, so the kernels and the float64 reference select and
# gate the same entries.
SELECTION_MARGIN = {torch.float32: 0.01, torch.float16: 0.01, torch.bfloat16: 0.05}


def topk_inputs(dtype, k, shape=(37,), shift=0.5, seed=0):
    """SAE inputs (odd sizes: d_in 43, n_dict 83) whose TopK selection no rounding can change: in every row the
    k-th and (k + 1)-th largest pre-activations differ by more than SELECTION_MARGIN, and none of the k largest
    is within it of 0 (rows that fail are drawn again). The encoder biases are -shift - 0.02 j in a random
    order of j, so a fair share of the selected pre-activations is negative, and token 5 (x = 0: its
    pre-activations are the biases, exactly, in every dtype) selects only negative ones: relu zeroes every code
    it selects."""
    g = torch.Generator().manual_seed(seed)
    n_dict, d_in, margin = TOPK_N_DICT, TOPK_D_IN, SELECTION_MARGIN[dtype]
    x = torch.randn(*shape, d_in, generator=g)
    rows = x.view(-1, d_in)  # (N, d_in)
    rows[5] = 0
    enc_weight = (torch.randn(n_dict, d_in, generator=g) / d_in**0.5).to(dtype)  # pre ~ N(0, 1) + bias
    enc_bias = (-shift - 0.02 * torch.randperm(n_dict, generator=g)).to(dtype)
    assert enc_bias.unique().numel() == n_dict and shift > margin, "token 5's selection must be clear-cut"
    for _ in range(100):
        pre = rows.to(dtype).double() @ enc_weight.double().t() + enc_bias.double()  # (N, n_dict), as both see it
        top = pre.topk(min(k + 1, n_dict), dim=-1).values  # (N, k + 1), largest first
        bad = (top[:, :k].abs() < margin).any(-1)
        if k < n_dict:
            bad |= top[:, k - 1] - top[:, k] < margin
        bad[5] = False  # exact biases, apart and below 0 (asserted above)
        if not bad.any():
            break
        rows[bad] = torch.randn(int(bad.sum()), d_in, generator=g)
    else:
        raise AssertionError("could not draw tokens whose TopK selection is clear-cut")
    dec_weight = torch.randn(d_in, n_dict, generator=g)
    dec_bias = torch.randn(d_in, generator=g)
    return [t.to(DEVICE, dtype) for t in (x, enc_weight, enc_bias, dec_weight, dec_bias)]


def assert_topk_code(c, inputs, k):
    """At most k codes per token fire, and the inputs put the gate to work: some selected codes are negative."""
    x, enc_weight, enc_bias = (t.double() for t in inputs[:3])
    selected = (x @ enc_weight.t() + enc_bias).topk(k, dim=-1).values  # (..., k)
    assert (selected < 0).any() and (selected > 0).any(), "the inputs should select codes of either sign"
    active = (c != 0).sum(-1)
    assert (active <= k).all() and (active == (selected > 0).sum(-1)).all() and (c >= 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 5, TOPK_N_DICT])
def test_sae_topk_forward_and_gradients(dtype, k, backend, monkeypatch):
    """k = 1, a small odd k and every code; random grad_outputs of x_hat and c; always the sparse path, even where
    the ReLU code's density threshold would pick the dense one."""
    backend("triton")
    force_path(monkeypatch, "dense")
    inputs = topk_inputs(dtype, k)
    c = check_sae(inputs, TOL[dtype], expect_sparse=True, k=k)
    assert_topk_code(c, inputs, k)


@pytest.mark.parametrize("case", ["x_hat only", "sparsity only", "x_hat and L1", "frozen x"])
def test_sae_topk_partial_gradients(case, backend):
    """(B, T, d) tokens; no gradient on c, only one on c (c.sum()'s expanded one), an L1 term on c beside x_hat's
    gradient (sign(c): dense, 0 off the code), an input without grad."""
    backend("triton")
    g = torch.Generator().manual_seed(7)
    g_x_hat = torch.randn(3, 7, TOPK_D_IN, generator=g).to(DEVICE)
    l1 = lambda c: 0.37 * c.abs().sum()
    grads_of, requires_grad = {
        "x_hat only": (lambda x_hat, c: ([x_hat], [g_x_hat]), (True,) * 5),
        "sparsity only": (lambda x_hat, c: ([0.37 * c.sum()], [torch.ones(())]), (True,) * 5),
        "x_hat and L1": (lambda x_hat, c: ([x_hat, l1(c)], [g_x_hat, torch.ones(())]), (True,) * 5),
        "frozen x": (lambda x_hat, c: ([x_hat, l1(c)], [g_x_hat, torch.ones(())]), (False,) + (True,) * 4),
    }[case]
    inputs = topk_inputs(torch.float32, 5, shape=(3, 7))
    c = check_sae(inputs, TOL[torch.float32], requires_grad, grads_of, expect_sparse=True, k=5)
    assert c.shape == (3, 7, TOPK_N_DICT)
    assert_topk_code(c, inputs, 5)


def test_sae_topk_where_most_selected_codes_are_negative(backend):
    """Biases far below 0: relu zeroes most of the k selected codes, and their gradients must stop there."""
    backend("triton")
    inputs = topk_inputs(torch.float32, 7, shift=2.0, seed=1)
    c = check_sae(inputs, TOL[torch.float32], expect_sparse=True, k=7)
    assert_topk_code(c, inputs, 7)
    assert (c > 0).sum().item() < 0.5 * 7 * c.shape[0], "most selected codes should be negative"


@pytest.mark.parametrize("k", [None, 5])
def test_sae_under_autocast(k, backend, monkeypatch):
    """fp32 weights under fp16 autocast: the Triton path runs in fp16 and returns fp32 gradients, for either code."""
    backend("triton")
    force_path(monkeypatch, "sparse")
    inputs = sae_inputs(torch.float16, "sparse") if k is None else topk_inputs(torch.float16, k)
    inputs = [t.float() for t in inputs]  # fp16 values, exact in fp32: autocast's casts lose nothing
    g = torch.Generator().manual_seed(8)
    g_x_hat = torch.randn(inputs[0].shape, generator=g).to(DEVICE)
    grads_of = lambda x_hat, c: ([x_hat, 0.37 * c.sum()], [g_x_hat, torch.ones(())])
    with torch.autocast(DEVICE, dtype=torch.float16):
        x_hat, c, grads = sae_run(inputs, (True,) * 5, grads_of, reference=False, k=k)
    ref_x_hat, ref_c, ref_grads = sae_run(inputs, (True,) * 5, grads_of, reference=True, k=k)
    assert x_hat.dtype == c.dtype == torch.float16 and all(grad.dtype == torch.float32 for grad in grads)
    assert path_of(c) == "triton"
    assert_close(x_hat, ref_x_hat, TOL[torch.float16], "x_hat")
    assert_close(c, ref_c, TOL[torch.float16], "c")
    for name, grad, ref in zip(["x", "enc_weight", "enc_bias", "dec_weight", "dec_bias"], grads, ref_grads):
        assert_close(grad, ref, TOL[torch.float16], f"d/d{name}")


def test_sae_topk_reference_is_the_definition():
    """The reference against TopK written out: per token, relu of the k largest pre-activations, 0 elsewhere;
    with k = n_dict it is the ReLU code."""
    x, enc_weight, enc_bias, dec_weight, dec_bias = (t.double() for t in topk_inputs(torch.float32, 5))
    pre = x @ enc_weight.t() + enc_bias  # (N, n_dict)
    expected = torch.zeros_like(pre)
    for i, row in enumerate(pre):
        for j in sorted(range(len(row)), key=lambda j: -row[j].item())[:5]:
            expected[i, j] = max(row[j].item(), 0.0)
    x_hat, c = sae_forward_torch(x, enc_weight, enc_bias, dec_weight, dec_bias, k=5)
    assert torch.equal(c != 0, expected != 0)
    assert_close(c, expected, 1e-12, "c")
    dictionary = dec_weight / dec_weight.norm(dim=0)
    assert_close(x_hat, expected @ dictionary.t() + dec_bias, 1e-12, "x_hat")
    relu = sae_forward_torch(x, enc_weight, enc_bias, dec_weight, dec_bias)
    topk_all = sae_forward_torch(x, enc_weight, enc_bias, dec_weight, dec_bias, k=TOPK_N_DICT)
    assert all(torch.equal(a, b) for a, b in zip(relu, topk_all))


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("k", [0, -1, TOPK_N_DICT + 1, 2.0, True, "5"])
def test_sae_rejects_a_bad_k(k, impl, backend):
    backend(impl)
    inputs = topk_inputs(torch.float32, 1)
    with pytest.raises(ValueError, match=f"k={k!r}: .* an int from 1 to n_dict={TOPK_N_DICT}"):
        sae_kernels.sae_forward(*inputs, k=k)


# ---------------------------------------------------------------------------------------------------------
# KL


def kl_reference(new_logits, orig_logits):
    """The loss and d loss / d new_logits (for grad_output 0.37) in float64."""
    new = new_logits.detach().double().requires_grad_()
    loss = kl_div_torch(new, orig_logits.double())
    loss.backward(torch.tensor(0.37, dtype=torch.float64, device=new.device))
    return loss.detach(), new.grad


def check_kl(new_logits, orig_logits, tol):
    new = new_logits.detach().clone().requires_grad_()
    orig = orig_logits.detach().clone().requires_grad_()  # a target that requires grad: gets none
    loss = sae_kernels.kl_div(new, orig)
    loss.backward(torch.tensor(0.37, device=new.device))
    ref_loss, ref_grad = kl_reference(new_logits, orig_logits)
    assert loss.dim() == 0 and orig.grad is None and new.grad.dtype == new.dtype
    assert_close(loss, ref_loss, tol, "kl")
    assert_close(new.grad, ref_grad, tol, "d kl / d new_logits")
    return loss, new.grad


@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_div_forward_and_gradient(dtype, backend):
    backend("triton")
    g = torch.Generator().manual_seed(3)
    new, orig = (torch.randn(3, 7, 301, generator=g).mul(2).to(DEVICE, dtype) for _ in range(2))
    check_kl(new, orig, TOL[dtype])


def test_kl_div_of_equal_distributions_is_zero(backend):
    backend("triton")
    logits = torch.randn(11, 301, device=DEVICE)
    loss, grad = check_kl(logits, logits, TOL[torch.float32])
    assert abs(loss.item()) < 1e-6 and grad.abs().max().item() < 1e-8


def test_kl_div_without_a_gradient_and_backward_twice(backend):
    """Under no_grad, or for logits that need no gradient, kl_div computes the loss alone; otherwise its gradient,
    computed in forward, is scaled by each backward without being changed (retain_graph gives it twice)."""
    backend("triton")
    g = torch.Generator().manual_seed(9)
    new, orig = (torch.randn(5, 301, generator=g).to(DEVICE) for _ in range(2))
    ref_loss, _ = kl_reference(new, orig)
    with torch.no_grad():
        loss = sae_kernels.kl_div(new.clone().requires_grad_(), orig)
    assert loss.grad_fn is None
    assert_close(loss, ref_loss, TOL[torch.float32], "kl under no_grad")
    assert_close(sae_kernels.kl_div(new, orig), ref_loss, TOL[torch.float32], "kl of logits without grad")
    logits = new.clone().requires_grad_()
    loss = sae_kernels.kl_div(logits, orig)
    (2 * loss).backward(retain_graph=True)
    first = logits.grad.clone()
    loss.backward()
    assert_close(logits.grad, 1.5 * first, TOL[torch.float32], "kl gradient, backward twice")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", ["peaked", "large"])
def test_kl_div_peaked_and_large_logits(case, dtype, backend):
    """One-hot-peaked rows (p ~ 1 on one entry, e^-1000 elsewhere) and logits of magnitude 1e4: no overflow."""
    backend("triton")
    g = torch.Generator().manual_seed(4)
    new, orig = (torch.randn(9, 301, generator=g) for _ in range(2))
    if case == "peaked":
        orig[torch.arange(9), torch.randint(0, 301, (9,), generator=g)] += 1000.0
        new[torch.arange(9), torch.randint(0, 301, (9,), generator=g)] += 30.0
    else:
        new, orig = new * 1e4, orig * 1e4
    loss, _ = check_kl(new.to(DEVICE, dtype), orig.to(DEVICE, dtype), TOL[dtype])
    assert loss.item() > 1.0  # genuinely different distributions, not a vacuous 0


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_bias, softcap", [(False, None), (True, None), (True, 1.5)])
def test_linear_kl_div_matches_the_full_logits_kl(impl, dtype, with_bias, softcap, backend):
    """Chunks of 16 rows over 37 tokens (and the default chunking) against kl_div on whole logits; with a bias
    (the log multiplicities of merged lm_head rows) added to both models' logits; with Gemma 2's soft cap,
    s tanh(z / s), on the logits before the bias (a cap of 1.5 bends logits of this size a lot)."""
    backend(impl)
    g = torch.Generator().manual_seed(5)
    h_new, h_orig = (torch.randn(37, 48, generator=g).to(DEVICE, dtype) for _ in range(2))
    weight = (torch.randn(301, 48, generator=g) / 48**0.5).to(DEVICE, dtype)
    bias = torch.randint(1, 50, (301,), generator=g).float().log().to(DEVICE) if with_bias else None
    w, b = weight.double(), (bias.double() if with_bias else 0.0)
    cap = (lambda z: softcap * torch.tanh(z / softcap)) if softcap else (lambda z: z)
    h_ref = h_new.double().requires_grad_()
    logits = cap(h_ref @ w.t()) + b  # (37, 301)
    ref_loss, ref_grad_logits = kl_reference(logits, cap(h_orig.double() @ w.t()) + b)
    logits.backward(ref_grad_logits)  # d kl / d h_new through the lm_head (and the cap), in float64
    ref_grad = h_ref.grad
    for chunk_rows in (16, None):
        h = h_new.clone().requires_grad_()
        loss = sae_kernels.linear_kl_div(h, h_orig, weight, bias, softcap, chunk_rows=chunk_rows)
        loss.backward(torch.tensor(0.37, device=DEVICE))
        assert_close(loss, ref_loss, TOL[dtype], f"kl, chunk_rows={chunk_rows}")
        assert_close(h.grad, ref_grad, TOL[dtype], f"d kl / d h_new, chunk_rows={chunk_rows}")


# ---------------------------------------------------------------------------------------------------------
# Dispatch


def test_backend_variable_picks_the_implementation(backend, monkeypatch):
    force_path(monkeypatch, "sparse")
    sae_args = [t.requires_grad_() for t in sae_inputs(torch.float32, "sparse")]
    logits = torch.randn(4, 301, device=DEVICE, requires_grad=True)
    h = torch.randn(4, 48, device=DEVICE, requires_grad=True)
    weight = torch.randn(301, 48, device=DEVICE)

    def names():
        return (path_of(sae_kernels.sae_forward(*sae_args)[0]),
                type(sae_kernels.kl_div(logits, logits.detach()).grad_fn).__name__)

    backend("triton")
    assert names() == ("triton", "PrecomputedGradBackward")
    backend("torch")
    assert names()[0] == "torch" and names()[1] != "PrecomputedGradBackward"
    backend("auto")
    sae_path, kl_name = names()
    assert sae_path == ("triton" if DEVICE == "cuda" else "torch")
    assert (kl_name == "PrecomputedGradBackward") == (DEVICE == "cuda")
    backend("torch")  # the reference of linear_kl_div is chunked too, and agrees with the kernel
    reference = sae_kernels.linear_kl_div(h, h.detach() + 0.1, weight, chunk_rows=16)
    backend("triton")
    assert_close(sae_kernels.linear_kl_div(h, h.detach() + 0.1, weight, chunk_rows=16), reference, TOL[torch.float32])
    backend("cuda")
    with pytest.raises(ValueError, match="E2ESAE_BACKEND"):
        sae_kernels.kl_div(logits, logits)


SCRIPT = """
import os, sys, torch
if sys.argv[1] == "no-triton":
    sys.modules["triton"] = None  # `import triton` now raises ImportError
import sae_kernels
logits = torch.randn(3, 17)
sae_kernels.kl_div(logits, logits)  # auto on a CPU: the reference, always available
os.environ["E2ESAE_BACKEND"] = "triton"
try:
    sae_kernels.kl_div(logits, logits)
except RuntimeError as e:
    print(e)
"""


@pytest.mark.parametrize("case", ["no-interpreter", "no-triton"])
def test_triton_backend_explains_what_is_missing(case):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "E2ESAE_BACKEND")}
    out = subprocess.run([sys.executable, "-c", SCRIPT, case], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    expected = "set TRITON_INTERPRET=1" if case == "no-interpreter" else "triton is not installed"
    assert expected in out.stdout, out.stdout


# ---------------------------------------------------------------------------------------------------------
# The whole loss


@pytest.mark.parametrize("full_metrics, path", [(False, "sparse"), (True, "dense")])
def test_compute_loss_is_the_same_with_either_backend(full_metrics, path, backend, monkeypatch):
    """e2e + downstream + local terms on a tiny GPT: loss and every SAE gradient, Triton vs the reference."""
    from e2esae import LossConfig, SAETransformer, compute_loss
    from model import GPT, GPTConfig

    force_path(monkeypatch, path)
    torch.manual_seed(6)
    gpt = GPT(GPTConfig(block_size=16, vocab_size=301, n_layer=2, n_head=2, n_embd=48, bias=True))
    model = SAETransformer(gpt, sae_positions=["blocks.1.hook_resid_pre"], dict_size_to_input_ratio=2.0).to(DEVICE)
    idx = torch.randint(0, 301, (2, 16), device=DEVICE)
    results = []
    for name in ("triton", "torch"):
        backend(name)
        model.zero_grad()
        loss, metrics = compute_loss(model, idx, LossConfig(sparsity_coeff=0.5, kl_coeff=1.0, in_to_orig_coeff=0.3,
                                                            in_to_orig_positions=["blocks.1.hook_resid_post"],
                                                            out_to_in_coeff=0.2), full_metrics=full_metrics)
        loss.backward()
        results.append((loss.detach(), metrics["kl"], [p.grad.clone() for p in model.saes.parameters()]))
    (loss, kl, grads), (ref_loss, ref_kl, ref_grads) = results
    assert_close(loss, ref_loss, 1e-5, "loss")
    assert_close(kl, ref_kl, 1e-5, "kl")
    for (name, _), grad, ref in zip(model.saes.named_parameters(), grads, ref_grads):
        assert_close(grad, ref, 1e-4, f"d loss / d {name}")
