"""The SAE over its selected pairs (sae_kernels/sparse.py) against the dense reference: forward, every gradient.

TopK, BatchTopK and ReLU on small odd shapes (37 tokens, d_in 24, n_dict 61, k = 5), in fp32, fp16 and fp64, with
random gradients for x_hat and for the code. References are computed in float64 from the same inputs by
sae.sae_forward_torch (the definition); the inputs are drawn so that no rounding can change what is selected.
On a machine with a GPU the same tests run there (the path runs on every device).

    python -m pytest tests/test_sparse_sae.py -q
"""
import pytest
import torch

import sae_kernels
from conftest import assert_close
from sae_kernels.sae import sae_forward_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def path_of(output):
    """Which path computed an output of sae_forward: "triton" or "torch" (the SAE over its selected pairs, with that
    set of primitives: its backward's ctx.ops), or "reference" (sae_forward_torch, by autograd)."""
    return getattr(getattr(output.grad_fn, "ops", None), "name", "reference")
N_TOKENS, D_IN, N_DICT, K = 37, 24, 61, 5
DTYPES = [torch.float32, torch.float16, torch.float64]
# Allowed error relative to the largest magnitude of the reference value (fp16 rounds every stored value).
TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.float64: 1e-12}
# fp16 moves a pre-activation of these inputs by up to ~0.002: selections and relu's gate farther apart than this
# are the same in every dtype.
MARGIN = 0.01
NAMES = ["x", "enc_weight", "enc_bias", "dec_weight", "dec_bias"]
CODES = {"topk": dict(k=K), "batch_topk": dict(k=K, batch_topk=True), "relu": {}}


def unclear(pre, code):
    """(N,) bool: the tokens whose selection or gate a rounding of MARGIN could change."""
    if code == "relu":
        return (pre.abs() < MARGIN).any(1)
    if code == "topk":
        top = pre.topk(K + 1, dim=1).values  # (N, K + 1), largest first
        return (top[:, :K].abs() < MARGIN).any(1) | (top[:, K - 1] - top[:, K] < MARGIN)
    values, flat = pre.flatten().topk(N_TOKENS * K + 1)  # the batch's selection and the first one left out
    bad = torch.zeros(pre.shape[0], dtype=torch.bool)
    bad[flat[(values[:-1].abs() < MARGIN).nonzero().squeeze(1)] // pre.shape[1]] = True
    if values[-2] - values[-1] < MARGIN:
        bad[flat[-2:] // pre.shape[1]] = True
    return bad


def sae_inputs(dtype, code, shift=0.5, seed=0):
    """x (37, 24) and the SAE's weights, such that no rounding changes the selection (tokens that fail are drawn
    again). Encoder biases -shift - 0.02 j in a random order: distinct, so token 5 (x = 0: its pre-activations are the
    biases, exactly) selects only negative ones under TopK and none under BatchTopK or ReLU; token 7, four times as
    large as the rest, gets many of BatchTopK's selections. ReLU fires on ~6% of the pairs at shift 1.0."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(N_TOKENS, 1)
    scale[5], scale[7] = 0, 4
    x = torch.randn(N_TOKENS, D_IN, generator=g) * scale
    enc_weight = (torch.randn(N_DICT, D_IN, generator=g) / D_IN**0.5).to(dtype)  # pre ~ N(0, 1) + bias
    enc_bias = (-shift - 0.02 * torch.randperm(N_DICT, generator=g)).to(dtype)
    for _ in range(100):
        pre = x.to(dtype).double() @ enc_weight.double().t() + enc_bias.double()  # (N, n_dict), as both see it
        bad = unclear(pre, code)
        if code != "batch_topk":
            bad[5] = False  # exact biases, 0.02 apart and below -shift
        if not bad.any():
            break
        x[bad] = torch.randn(int(bad.sum()), D_IN, generator=g) * scale[bad]
    else:
        raise AssertionError("could not draw tokens whose selection is clear-cut")
    dec_weight = torch.randn(D_IN, N_DICT, generator=g)
    dec_bias = torch.randn(D_IN, generator=g)
    return [t.to(DEVICE, dtype) for t in (x, enc_weight, enc_bias, dec_weight, dec_bias)]


def run(inputs, code, reference, requires_grad=(True,) * 5, grads=("x_hat", "c"), dense=True):
    """x_hat, the dense c and the input gradients (None where not required) of the sparse path or of the float64
    reference, for random output gradients (seeded: the same for both).

    grads names the outputs that receive one: x_hat, c (dense, random), c.sum() (a sparsity term: an expanded
    gradient) or value (the same term read from the pairs; c.sum() for the reference)."""
    ins = [t.detach().clone() for t in inputs]
    ins = [(t.double() if reference else t).requires_grad_(r) for t, r in zip(ins, requires_grad)]
    if reference:
        x_hat, c = sae_forward_torch(*ins, **CODES[code])
        value_sum = c.sum()
    else:
        x_hat, sparse_code = sae_kernels.sae_forward_sparse(*ins, **CODES[code], dense=dense)
        c, value_sum = sparse_code.to_dense(), sparse_code.value.sum()
    g = torch.Generator().manual_seed(1)
    terms = {"x_hat": (x_hat, torch.randn(inputs[0].shape, generator=g)),
             "c": (c, torch.randn(N_TOKENS, N_DICT, generator=g)),
             "c.sum()": (0.37 * c.sum(), torch.ones(())), "value": (0.37 * value_sum, torch.ones(()))}
    outputs, grad_outputs = zip(*(terms[name] for name in grads))
    wrt = [t for t in ins if t.requires_grad]
    found = iter(torch.autograd.grad(outputs, wrt, [gr.to(o) for o, gr in zip(outputs, grad_outputs)],
                                     allow_unused=True))
    return x_hat.detach(), c.detach(), [next(found) if t.requires_grad else None for t in ins]


def check(inputs, code, tol, **kwargs):
    """The sparse path against the reference: x_hat, c and every gradient, in the inputs' dtype."""
    x_hat, c, grads = run(inputs, code, reference=False, **kwargs)
    ref_x_hat, ref_c, ref_grads = run(inputs, code, reference=True, **kwargs)
    assert x_hat.dtype == c.dtype == inputs[0].dtype
    assert_close(x_hat, ref_x_hat, tol, "x_hat")
    assert_close(c, ref_c, tol, "c")
    for name, grad, ref in zip(NAMES, grads, ref_grads):
        if ref is None:
            assert grad is None, f"d/d{name} should be None"
        else:
            assert grad.dtype == inputs[0].dtype, f"d/d{name} is {grad.dtype}"
            assert_close(grad, ref, tol, f"d/d{name}")
    return c


@pytest.mark.parametrize("x_grad", [True, False], ids=["x needs grad", "x frozen"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("code", list(CODES))
def test_sparse_path_matches_the_dense_reference(code, dtype, x_grad):
    """Forward and every gradient, random gradients for x_hat and for c, with and without a gradient for x."""
    inputs = sae_inputs(dtype, code, shift=1.0 if code == "relu" else 0.5)
    c = check(inputs, code, TOL[dtype], requires_grad=(x_grad,) + (True,) * 4)
    active = (c > 0).sum(1)
    if code == "topk":
        assert (active <= K).all() and active[5] == 0, "token 5 selects only negative pre-activations"
    elif code == "relu":
        assert 0.02 < (c > 0).float().mean() < 0.1, "the ReLU inputs should be sparse"


@pytest.mark.parametrize("code", list(CODES))
@pytest.mark.parametrize("grads", [("x_hat",), ("c.sum()",), ("value",), ("x_hat", "value")])
@pytest.mark.parametrize("dense", [True, False], ids=["dense c", "pairs only"])
def test_sparse_path_partial_gradients(grads, code, dense):
    """Gradients through x_hat alone, through the code alone (as c.sum(), an expanded gradient, or the values),
    or both; with and without the dense c."""
    inputs = sae_inputs(torch.float32, code, shift=1.0 if code == "relu" else 0.5)
    check(inputs, code, TOL[torch.float32], grads=grads, dense=dense)


def test_topk_with_most_selected_codes_negative():
    """Biases far below 0: relu zeroes most of the k selected codes, and their gradients stop there."""
    inputs = sae_inputs(torch.float32, "topk", shift=2.0, seed=1)
    c = check(inputs, "topk", TOL[torch.float32])
    assert (c > 0).sum().item() < 0.5 * K * N_TOKENS, "most selected codes should be negative"


def test_batch_topk_is_e2esaes_training_code():
    """N k pairs over the batch, not k per token: token 5 gets none, token 7 more than the 2 k candidates first
    searched per token (so the search widens); the same code as e2esae.BatchTopK in training mode."""
    from e2esae import BatchTopK
    inputs = sae_inputs(torch.float32, "batch_topk")
    x_hat, code = sae_kernels.sae_forward_sparse(*inputs, k=K, batch_topk=True)
    per_token = code.row_ptr.diff()
    assert code.col.numel() == N_TOKENS * K and per_token[5] == 0 and per_token[7] > 2 * K, per_token
    assert torch.equal(code.rows(), torch.arange(N_TOKENS, device=DEVICE).repeat_interleave(per_token))
    module = BatchTopK(K, inputs[1].shape[0]).train()
    expected = module(torch.nn.functional.linear(inputs[0], inputs[1], inputs[2]))
    assert_close(code.to_dense(), expected, TOL[torch.float32], "c")
    kept = code.value[code.value > 0]
    assert module.threshold.item() == pytest.approx(0.01 * kept.min().item()), "the pairs give the threshold's min"


def test_no_code_fires():
    """ReLU with every pre-activation below 0: no pairs; x_hat is the decoder bias and only it gets a gradient."""
    inputs = sae_inputs(torch.float32, "relu", shift=100.0)
    x_hat, code = sae_kernels.sae_forward_sparse(*inputs)
    assert code.col.numel() == 0 and not code.row_ptr.any() and code.row_ptr.shape == (N_TOKENS + 1,)
    check(inputs, "relu", TOL[torch.float32])


def test_column_major_decoder_weight():
    """W_dec stored column-major (its transpose contiguous, no copy needed): the same values, and its gradient in
    its own layout."""
    inputs = sae_inputs(torch.float32, "topk")
    column_major = inputs[:3] + [inputs[3].t().contiguous().t()] + inputs[4:]
    assert column_major[3].t().is_contiguous() and torch.equal(column_major[3], inputs[3])
    check(column_major, "topk", TOL[torch.float32])
    dec_weight = inputs[3].t().contiguous().t().requires_grad_()
    x_hat, _ = sae_kernels.sae_forward_sparse(inputs[0], inputs[1], inputs[2], dec_weight, inputs[4], k=K)
    x_hat.sum().backward()
    assert dec_weight.grad.stride() == dec_weight.stride()


def test_under_autocast():
    """fp32 weights under fp16 autocast: the path runs in fp16 and returns fp32 gradients."""
    inputs = [t.float() for t in sae_inputs(torch.float16, "topk")]  # fp16 values, exact in fp32
    with torch.autocast(DEVICE, dtype=torch.float16):
        x_hat, c, grads = run(inputs, "topk", reference=False)
    ref_x_hat, ref_c, ref_grads = run(inputs, "topk", reference=True)
    assert x_hat.dtype == c.dtype == torch.float16 and all(grad.dtype == torch.float32 for grad in grads)
    assert_close(x_hat, ref_x_hat, TOL[torch.float16], "x_hat")
    assert_close(c, ref_c, TOL[torch.float16], "c")
    for name, grad, ref in zip(NAMES, grads, ref_grads):
        assert_close(grad, ref, TOL[torch.float16], f"d/d{name}")


# ---------------------------------------------------------------------------------------------------------
# Dispatch: sae_forward


@pytest.mark.parametrize("name", ["torch", "auto"])
def test_sae_forward_takes_the_sparse_path_without_triton(name, backend):
    """TopK and BatchTopK through sae_forward on a CPU (auto) or with E2ESAE_BACKEND=torch: the sparse path,
    returning the dense c; and the same as the reference. (auto on a GPU: Triton for TopK.)"""
    backend(name)
    for code in ("topk", "batch_topk"):
        inputs = [t.requires_grad_() for t in sae_inputs(torch.float32, code)]
        x_hat, c = sae_kernels.sae_forward(*inputs, **CODES[code])
        triton = name == "auto" and DEVICE == "cuda" and code == "topk"
        assert path_of(x_hat) == ("triton" if triton else "torch") and c.grad_fn is x_hat.grad_fn
        ref_x_hat, ref_c = sae_forward_torch(*inputs, **CODES[code])
        assert_close(x_hat, ref_x_hat, TOL[torch.float32], "x_hat")
        assert_close(c, ref_c, TOL[torch.float32], "c")


def test_sae_forward_relu_picks_its_path_from_the_density(backend, monkeypatch):
    backend("torch")
    monkeypatch.setattr(sae_kernels.sae, "CPU_SPARSE_MAX_DENSITY", 0.2)  # a CPU's threshold
    monkeypatch.setattr(sae_kernels.sae, "SPARSE_MAX_DENSITY", 0.2)  # a GPU's
    for shift, expect_sparse in ((1.0, True), (0.0, False)):  # ~10% and ~50% of the codes fire
        inputs = [t.requires_grad_() for t in sae_inputs(torch.float32, "relu", shift=shift)]
        x_hat, c = sae_kernels.sae_forward(*inputs)
        density = (c > 0).float().mean().item()
        assert path_of(x_hat) == ("torch" if expect_sparse else "reference"), f"density {density}"
        assert (density <= 0.2) == expect_sparse


def test_batch_topk_takes_the_sparse_path_under_triton_too(backend):
    """BatchTopK has no Triton kernel: E2ESAE_BACKEND=triton runs it on the sparse path; TopK stays on Triton."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and not sae_kernels.backend.INTERPRET:
        pytest.skip("triton cannot run on this CPU without TRITON_INTERPRET=1")
    backend("triton")
    inputs = [t.requires_grad_() for t in sae_inputs(torch.float32, "batch_topk")]
    assert path_of(sae_kernels.sae_forward(*inputs, k=K, batch_topk=True)[0]) == "torch"
    assert path_of(sae_kernels.sae_forward(*inputs, k=K)[0]) == "triton"


def test_batch_topk_needs_k():
    inputs = sae_inputs(torch.float32, "topk")
    for fn in (sae_kernels.sae_forward, sae_kernels.sae_forward_sparse):
        with pytest.raises(ValueError, match="batch_topk=True .* give k"):
            fn(*inputs, batch_topk=True)
