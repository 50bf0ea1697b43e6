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
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede `import kernels`: @triton.jit reads it
pytest.importorskip("triton")

import kernels  # noqa: E402
from kernels.kl import kl_div_torch  # noqa: E402
from kernels.sae import sae_forward_torch  # noqa: E402

if not torch.cuda.is_available() and not kernels.backend.INTERPRET:
    raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set (by another test module?), so its "
                       "kernels cannot run on this CPU: set it in tests/conftest.py, before anything imports triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# Allowed error relative to the largest magnitude of the reference value (fp16 / bf16 round every stored value).
TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@pytest.fixture
def backend(monkeypatch):
    """Set E2ESAE_BACKEND for one test: backend("triton")."""
    return lambda name: monkeypatch.setenv("E2ESAE_BACKEND", name)


def assert_close(actual, expected, tol, name=""):
    assert actual is not None and expected is not None, f"{name}: a gradient is missing"
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} vs {expected.shape}"
    assert torch.isfinite(actual).all(), f"{name}: not finite"
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1e-6)
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol} x {scale:.3g}"


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


def sae_run(inputs, requires_grad, grads_of, reference):
    """Outputs and input gradients of one SAE call; grads_of(x_hat, c) -> ([outputs], [grad_outputs])."""
    leaves = [t.detach().clone().double() if reference else t.detach().clone() for t in inputs]
    for t, r in zip(leaves, requires_grad):
        t.requires_grad_(r)
    x_hat, c = (sae_forward_torch if reference else kernels.sae_forward)(*leaves)
    outputs, grad_outputs = grads_of(x_hat, c)
    wrt = [t for t in leaves if t.requires_grad]
    grads = iter(torch.autograd.grad(outputs, wrt, [g.to(o.dtype) for o, g in zip(outputs, grad_outputs)],
                                     allow_unused=True))
    return x_hat, c, [next(grads) if t.requires_grad else None for t in leaves]


def check_sae(inputs, tol, requires_grad=(True,) * 5, grads_of=None, expect_sparse=None):
    if grads_of is None:  # random gradients for both outputs (c's stands in for a sparsity term)
        g = torch.Generator().manual_seed(1)
        x, n_dict = inputs[0], inputs[1].shape[0]
        g_x_hat = torch.randn(x.shape, generator=g).to(DEVICE)
        g_c = torch.randn(*x.shape[:-1], n_dict, generator=g).to(DEVICE)
        grads_of = lambda x_hat, c: ([x_hat, c], [g_x_hat, g_c])
    x_hat, c, grads = sae_run(inputs, requires_grad, grads_of, reference=False)
    ref_x_hat, ref_c, ref_grads = sae_run(inputs, requires_grad, grads_of, reference=True)
    if expect_sparse is not None:
        assert c.grad_fn.sparse == expect_sparse
    assert x_hat.dtype == c.dtype == inputs[0].dtype
    assert_close(x_hat, ref_x_hat, tol, "x_hat")
    assert_close(c, ref_c, tol, "c")
    for name, grad, ref in zip(["x", "enc_weight", "enc_bias", "dec_weight", "dec_bias"], grads, ref_grads):
        if ref is None:
            assert grad is None, f"d/d{name} should be None"
        else:
            assert_close(grad, ref, tol, f"d/d{name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("regime", ["sparse", "dense"])
@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_sae_forward_and_gradients(dtype, regime, path, backend, monkeypatch):
    """Either path (forced through the density threshold) on sparse or dense codes, random grad_outputs."""
    backend("triton")
    monkeypatch.setattr(kernels.sae, "SPARSE_MAX_DENSITY", 1.0 if path == "sparse" else 0.0)
    check_sae(sae_inputs(dtype, regime), TOL[dtype], expect_sparse=path == "sparse")


@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("case", ["x_hat only", "sparsity only", "frozen x"])
def test_sae_partial_gradients(case, path, backend, monkeypatch):
    """Unused outputs (their gradient is None), c.sum()'s expanded gradient, an input without grad."""
    backend("triton")
    monkeypatch.setattr(kernels.sae, "SPARSE_MAX_DENSITY", 1.0 if path == "sparse" else 0.0)
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
    monkeypatch.setattr(kernels.sae, "SPARSE_MAX_DENSITY", 0.2)
    for regime, sparse in (("sparse", True), ("dense", False)):
        x_hat, c = kernels.sae_forward(*[t.requires_grad_() for t in sae_inputs(torch.float32, regime)])
        density = (c > 0).float().mean().item()
        assert (density <= 0.2) == sparse and c.grad_fn.sparse == sparse, f"{regime}: density {density:.3f}"


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
    loss = kernels.kl_div(new, orig)
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
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_kl_div_matches_the_full_logits_kl(impl, dtype, with_bias, backend):
    """Chunks of 16 rows over 37 tokens (and the default chunking) against kl_div on whole logits; with a bias
    (the log multiplicities of merged lm_head rows) added to both models' logits."""
    backend(impl)
    g = torch.Generator().manual_seed(5)
    h_new, h_orig = (torch.randn(37, 48, generator=g).to(DEVICE, dtype) for _ in range(2))
    weight = (torch.randn(301, 48, generator=g) / 48**0.5).to(DEVICE, dtype)
    bias = torch.randint(1, 50, (301,), generator=g).float().log().to(DEVICE) if with_bias else None
    w, b = weight.double(), (bias.double() if with_bias else 0.0)
    ref_loss, ref_grad_logits = kl_reference(h_new.double() @ w.t() + b, h_orig.double() @ w.t() + b)
    ref_grad = ref_grad_logits @ w  # (37, 301) @ (301, 48)
    for chunk_rows in (16, None):
        h = h_new.clone().requires_grad_()
        loss = kernels.linear_kl_div(h, h_orig, weight, bias, chunk_rows=chunk_rows)
        loss.backward(torch.tensor(0.37, device=DEVICE))
        assert_close(loss, ref_loss, TOL[dtype], f"kl, chunk_rows={chunk_rows}")
        assert_close(h.grad, ref_grad, TOL[dtype], f"d kl / d h_new, chunk_rows={chunk_rows}")


# ---------------------------------------------------------------------------------------------------------
# Dispatch


def test_backend_variable_picks_the_implementation(backend):
    sae_args = [t.requires_grad_() for t in sae_inputs(torch.float32, "sparse")]
    logits = torch.randn(4, 301, device=DEVICE, requires_grad=True)
    h = torch.randn(4, 48, device=DEVICE, requires_grad=True)
    weight = torch.randn(301, 48, device=DEVICE)

    def names():
        return (type(kernels.sae_forward(*sae_args)[0].grad_fn).__name__,
                type(kernels.kl_div(logits, logits.detach()).grad_fn).__name__)

    backend("triton")
    assert names() == ("SAEForwardTritonBackward", "KLDivTritonBackward")
    backend("torch")
    assert "Triton" not in "".join(names())
    backend("auto")
    assert ("Triton" in "".join(names())) == (DEVICE == "cuda")
    backend("torch")  # the reference of linear_kl_div is chunked too, and agrees with the kernel
    reference = kernels.linear_kl_div(h, h.detach() + 0.1, weight, chunk_rows=16)
    backend("triton")
    assert_close(kernels.linear_kl_div(h, h.detach() + 0.1, weight, chunk_rows=16), reference, TOL[torch.float32])
    backend("cuda")
    with pytest.raises(ValueError, match="E2ESAE_BACKEND"):
        kernels.kl_div(logits, logits)


SCRIPT = """
import os, sys, torch
if sys.argv[1] == "no-triton":
    sys.modules["triton"] = None  # `import triton` now raises ImportError
import kernels
logits = torch.randn(3, 17)
kernels.kl_div(logits, logits)  # auto on a CPU: the reference, always available
os.environ["E2ESAE_BACKEND"] = "triton"
try:
    kernels.kl_div(logits, logits)
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
    from e2esae import SAETransformer, compute_loss
    from model import GPT, GPTConfig

    monkeypatch.setattr(kernels.sae, "SPARSE_MAX_DENSITY", 1.0 if path == "sparse" else 0.0)
    torch.manual_seed(6)
    gpt = GPT(GPTConfig(block_size=16, vocab_size=301, n_layer=2, n_head=2, n_embd=48, bias=True))
    model = SAETransformer(gpt, sae_positions=["blocks.1.hook_resid_pre"], dict_size_to_input_ratio=2.0).to(DEVICE)
    idx = torch.randint(0, 301, (2, 16), device=DEVICE)
    results = []
    for name in ("triton", "torch"):
        backend(name)
        model.zero_grad()
        loss, metrics = compute_loss(model, idx, sparsity_coeff=0.5, kl_coeff=1.0, in_to_orig_coeff=0.3,
                                     in_to_orig_positions=["blocks.1.hook_resid_post"], out_to_in_coeff=0.2,
                                     full_metrics=full_metrics)
        loss.backward()
        results.append((loss.detach(), metrics["kl"], [p.grad.clone() for p in model.saes.parameters()]))
    (loss, kl, grads), (ref_loss, ref_kl, ref_grads) = results
    assert_close(loss, ref_loss, 1e-5, "loss")
    assert_close(kl, ref_kl, 1e-5, "kl")
    for (name, _), grad, ref in zip(model.saes.named_parameters(), grads, ref_grads):
        assert_close(grad, ref, 1e-4, f"d loss / d {name}")
