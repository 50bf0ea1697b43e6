"""The SAE variants (TopK, BatchTopK, JumpReLU) and the auxiliary-k loss against their papers' definitions, written
out independently here; every activation under every training type; the settings each one refuses."""
import pytest
import torch
import torch.nn.functional as F

from e2esae import (
    SAE,
    DeadElements,
    FeatureCounts,
    LossConfig,
    SAETransformer,
    aux_k_loss,
    compute_loss,
    geometric_median,
    make_activation,
)
from model import GPT, GPTConfig

V, D = 101, 32
POS = "blocks.1.hook_resid_pre"


def small_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=3, n_embd=D, n_head=4, vocab_size=V, block_size=16)).eval()


def tokens(B=3, T=11, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def unit_dictionary(sae):
    W = sae.decoder.weight
    return W / torch.sqrt((W ** 2).sum(0, keepdim=True))


# ---- each activation, from its definition ----

def test_topk_keeps_each_tokens_k_largest_through_relu():
    torch.manual_seed(0)
    sae = SAE(D, 80, activation="topk", k=5)
    x = torch.randn(4, 7, D)
    x_hat, c = sae(x)  # the fused path (on a CPU: kernels' PyTorch reference)
    pre = x @ sae.encoder.weight.T + sae.encoder.bias
    expected = torch.zeros_like(pre)
    for i in range(4):
        for t in range(7):
            top = sorted(range(80), key=lambda j: -pre[i, t, j].item())[:5]
            for j in top:
                expected[i, t, j] = max(pre[i, t, j].item(), 0.0)
    torch.testing.assert_close(c, expected)
    assert ((c > 0).sum(-1) <= 5).all() and (c > 0).sum(-1).float().mean() > 4
    torch.testing.assert_close(x_hat, c @ unit_dictionary(sae).T + sae.decoder.bias)
    # the activation module on its own (what BatchTopK and JumpReLU use) agrees with the fused path
    torch.testing.assert_close(sae.activation(pre), c)


def test_batchtopk_keeps_b_times_k_over_the_batch_and_estimates_its_threshold():
    torch.manual_seed(1)
    sae = SAE(D, 64, activation="batchtopk", k=3)
    x = torch.randn(10, D)
    pre = x @ sae.encoder.weight.T + sae.encoder.bias
    sae.train()
    _, c = sae(x)
    acts = F.relu(pre).flatten()
    kept = acts.topk(30).values
    expected = torch.where(F.relu(pre) >= kept.min(), F.relu(pre), torch.zeros_like(pre))
    torch.testing.assert_close(c, expected)
    assert int((c > 0).sum()) == 30 and len(set((c > 0).sum(-1).tolist())) > 1  # k per token on average only
    assert sae.activation.threshold.item() == pytest.approx(0.01 * kept.min().item(), rel=1e-5)  # 0.99 * 0 + 0.01 min
    _, c2 = sae(x)
    assert sae.activation.threshold.item() == pytest.approx(0.99 * 0.01 * kept.min().item() + 0.01 * kept.min().item(),
                                                             rel=1e-5)
    # inference: one threshold for every element, c = pre [pre > theta]; saved with the weights
    sae.eval()
    theta = sae.activation.threshold.item()
    _, c3 = sae(x)
    torch.testing.assert_close(c3, pre * (pre > theta))
    assert "activation.threshold" in sae.state_dict()


def test_jumprelu_forward_and_its_straight_through_gradients():
    """c = pre H(pre - theta); d c / d theta = -(theta / eps) K((pre - theta) / eps); the L0 penalty's
    d / d theta = -(1 / eps) K(...), and no gradient of the penalty reaches pre (Rajamanoharan et al. 2024)."""
    torch.manual_seed(2)
    eps = 0.5
    act = make_activation("jumprelu", 6, bandwidth=eps, init_threshold=0.2)
    with torch.no_grad():
        act.threshold.copy_(torch.tensor([0.1, 0.3, 0.5, 0.0, 1.0, 0.25]))
    pre = torch.randn(9, 6, requires_grad=True)
    theta = act.threshold.detach()
    c = act(pre)
    torch.testing.assert_close(c, pre.detach() * (pre.detach() > theta))
    g = torch.randn(9, 6)
    (c * g).sum().backward()
    near = ((pre.detach() - theta).abs() < eps / 2).float()
    torch.testing.assert_close(act.threshold.grad, (-(theta / eps) * near * g).sum(0))
    torch.testing.assert_close(pre.grad, g * (pre.detach() > theta))
    act.threshold.grad, pre.grad = None, None
    l0 = act.penalty(c.detach(), pre, p_norm=1.0)  # ||c||_0 per token, through the estimator
    torch.testing.assert_close(l0, (pre.detach() > theta).float().sum(-1))
    l0.sum().backward()
    torch.testing.assert_close(act.threshold.grad, (-(1 / eps) * near).sum(0))
    assert pre.grad is None  # the penalty moves the thresholds only


def test_jumprelu_thresholds_stay_non_negative_in_training():
    act = make_activation("jumprelu", 4)
    with torch.no_grad():
        act.threshold.copy_(torch.tensor([-0.5, 0.1, -1e-3, 2.0]))
    act.project_()  # what train.py does after each step
    assert torch.equal(act.threshold.detach(), torch.tensor([0.0, 0.1, 0.0, 2.0]))
    with torch.no_grad():
        act.threshold[0] = -1.0
    act.train()
    act(torch.randn(3, 4))  # a training forward projects too, for loops that do not
    assert act.threshold[0].item() == 0.0


@pytest.mark.parametrize("activation, k, message", [
    ("topk", None, "needs k"), ("batchtopk", 0, "needs k"), ("topk", 81, "needs k"), ("relu", 8, "has no k"),
    ("jumprelu", 8, "has no k"), ("gated", None, "must be one of"),
])
def test_activation_settings_that_make_no_sense_are_refused(activation, k, message):
    with pytest.raises(ValueError, match=message):
        SAE(D, 80, activation=activation, k=k)
    with pytest.raises(ValueError, match="bandwidth and init_threshold are JumpReLU's"):
        SAE(D, 80, activation="relu", bandwidth=0.1)


# ---- the auxiliary-k loss and dead elements ----

def test_aux_k_loss_reconstructs_the_residual_from_the_dead_elements_only():
    torch.manual_seed(3)
    sae = SAE(D, 64, activation="topk", k=4)
    x = torch.randn(12, D)
    x_hat, _ = sae(x)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[torch.tensor([1, 5, 9, 20, 33, 34, 40, 63])] = True  # 8 dead: fewer than k_aux = d_in // 2 = 16
    loss = aux_k_loss(sae, x, x_hat, dead)
    # by hand: the dead elements' pre-activations, the top min(16, 8) = all 8 of them through relu, decoded
    # without the bias, against the residual; scaled by n_dead / k_aux = 8 / 16
    ids = dead.nonzero().squeeze(1)
    pre = x @ sae.encoder.weight[ids].T + sae.encoder.bias[ids]
    e_hat = F.relu(pre) @ unit_dictionary(sae)[:, ids].T
    expected = 0.5 * ((e_hat - (x - x_hat)) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    grad = sae.encoder.weight.grad
    assert grad[ids].abs().sum() > 0 and grad[~dead].abs().sum() == 0  # only the dead elements learn from it
    assert aux_k_loss(sae, x, x_hat, torch.zeros(64, dtype=torch.bool)).item() == 0


def test_aux_k_loss_takes_the_largest_dead_pre_activations():
    torch.manual_seed(4)
    sae = SAE(8, 40, activation="topk", k=2)  # k_aux = 4
    x = torch.randn(5, 8)
    x_hat, _ = sae(x)
    dead = torch.ones(40, dtype=torch.bool)
    pre = x @ sae.encoder.weight.T + sae.encoder.bias
    top = pre.topk(4, dim=-1)
    codes = torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))
    expected = ((codes @ unit_dictionary(sae).T - (x - x_hat)) ** 2).mean()  # scale min(40 / 4, 1) = 1
    torch.testing.assert_close(aux_k_loss(sae, x, x_hat, dead), expected)


def test_dead_elements_count_tokens_since_each_last_fired():
    model = SAETransformer(small_gpt(), [POS], dict_size_to_input_ratio=0.25)  # 8 elements
    dead, counts = DeadElements(model, window=10), FeatureCounts(model)
    fired = torch.zeros(6, 8, dtype=torch.bool)
    fired[0, 2] = fired[5, 3] = True
    counts.update(POS, fired)
    dead.step(counts)
    assert dead.masks()[POS].tolist() == [False] * 8  # 6 tokens: none dead yet
    counts = FeatureCounts(model)
    counts.update(POS, torch.zeros(6, 8, dtype=torch.bool) | (torch.arange(8) == 3))
    dead.step(counts)
    assert dead.masks()[POS].tolist() == [True, True, False, False, True, True, True, True]  # 2 fired 6 tokens ago
    again = DeadElements(model, window=10)
    again.load_state_dict(dead.state_dict())
    assert torch.equal(again.since[POS], dead.since[POS])


# ---- every activation under every training type ----

TYPES = {"local": dict(kl_coeff=0.0, out_to_in_coeff=1.0),
         "e2e": dict(kl_coeff=1.0),
         "e2e+ds": dict(kl_coeff=0.5, in_to_orig_coeff=1.0, in_to_orig_positions=["blocks.2.hook_resid_pre"])}
ACTIVATIONS = {"relu": dict(), "topk": dict(k=3), "batchtopk": dict(k=3), "jumprelu": dict(bandwidth=0.5)}


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_each_activation_trains_under_each_type(activation, kind):
    """The loss is the sum of its terms (recomputed here from the SAE's own outputs), and a few Adam steps on it
    lower it, for every activation and training type, two SAEs chained."""
    torch.manual_seed(5)
    model = SAETransformer(small_gpt(), [POS, "blocks.2.hook_resid_post"], 2.0, activation=activation,
                           **ACTIVATIONS[activation]).train()
    coeffs = dict(sparsity_coeff=0.1, aux_k_coeff=1 / 32, **TYPES[kind])
    dead = {p: torch.arange(64) % 3 == 0 for p in model.sae_positions}  # a third of each dictionary dead
    idx = tokens(seed=6)
    loss, m = compute_loss(model, idx, LossConfig(**coeffs), full_metrics=False, dead=dead)
    expected = 0.0
    for p in model.sae_positions:
        assert (f"out_to_in/{p}" in m) == bool(coeffs.get("out_to_in_coeff"))  # a term at 0 is not computed
        expected += 0.1 * m[f"sparsity/{p}"] + coeffs.get("out_to_in_coeff", 0.0) * m.get(f"out_to_in/{p}", 0.0)
        expected += coeffs["aux_k_coeff"] * m[f"aux_k/{p}"]
        assert m[f"aux_k/{p}"] > 0  # dead elements, a residual: the auxiliary term is there
        if activation == "topk":
            assert m[f"l0/{p}"] <= 3
    expected += coeffs["kl_coeff"] * m.get("kl", 0.0) + m.get("in_to_orig/blocks.2.hook_resid_pre", 0.0)
    torch.testing.assert_close(loss.detach(), torch.as_tensor(expected, dtype=loss.dtype), rtol=1e-5, atol=1e-7)
    optimizer = torch.optim.Adam(model.saes.parameters(), lr=3e-3)
    first = loss.item()
    for _ in range(15):
        loss, _ = compute_loss(model, idx, LossConfig(**coeffs), full_metrics=False, dead=dead)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first
    if activation == "jumprelu":  # the thresholds moved, through the estimator alone
        assert not torch.allclose(model.sae(POS).activation.threshold, torch.full((64,), 0.001))


def test_fused_topk_gives_the_module_path_loss_and_gradients():
    """TopK through sae_kernels.sae_forward(k=...) equals the same SAE computed from its activation module."""
    torch.manual_seed(7)
    model = SAETransformer(small_gpt(), [POS], 2.0, activation="topk", k=4)
    idx = tokens(seed=8)
    results = []
    for fused in ({"k": 4}, None):
        model.sae(POS).activation.fused = fused
        model.zero_grad()
        loss, _ = compute_loss(model, idx, LossConfig(sparsity_coeff=0.3, kl_coeff=1.0), full_metrics=False)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.saes.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_evaluation_uses_batchtopks_threshold_and_restores_training_mode():
    from e2esae import evaluate
    torch.manual_seed(9)
    model = SAETransformer(small_gpt(), [POS], 2.0, activation="batchtopk", k=2).train()
    with torch.no_grad():
        model.sae(POS).activation.threshold.fill_(0.05)
    figures, _ = evaluate(model, [tokens(seed=10)], LossConfig(sparsity_coeff=0.0, kl_coeff=1.0))
    assert model.training and model.sae(POS).activation.threshold.item() == pytest.approx(0.05)  # unmoved
    x = model.gpt.run_blocks(model.gpt.embed(tokens(seed=10)), 0, 1)
    pre = model.sae(POS).encoder(x)
    assert figures[f"l0/{POS}"] == pytest.approx((pre > 0.05).sum(-1).float().mean().item(), rel=1e-5)


def test_kl_rescale_is_karvonens_combination():
    """0.5 (mse + alpha kl) with alpha = (mse / kl) detached: the value is the MSE's, the KL's gradient scaled."""
    torch.manual_seed(11)
    model = SAETransformer(small_gpt(), [POS], 2.0, activation="topk", k=4)
    idx = tokens(seed=12)
    rescaled = LossConfig(sparsity_coeff=0.0, kl_coeff=1.0, out_to_in_coeff=1.0, kl_rescale=True)
    loss, m = compute_loss(model, idx, rescaled, full_metrics=False)
    mse, kl = m[f"out_to_in/{POS}"], m["kl"]
    torch.testing.assert_close(m["kl_alpha"], mse / kl)
    torch.testing.assert_close(loss.detach(), 0.5 * (mse + (mse / kl) * kl))
    with pytest.raises(ValueError, match="kl_rescale scales the KL term"):
        compute_loss(model, idx, LossConfig(sparsity_coeff=0.0, kl_coeff=1.0, kl_rescale=True))


# ---- the TopK paper's initialisation and input normalisation ----

def test_geometric_median_minimises_the_sum_of_distances():
    x = torch.randn(200, 5, generator=torch.Generator().manual_seed(3)) * torch.tensor([1.0, 2, 3, 4, 50])
    x[:20] += 100.0  # outliers pull the mean, not the median
    median = geometric_median(x.double(), iterations=200)
    cost = lambda m: (x.double() - m).norm(dim=1).sum()
    for step in (1e-3, -1e-3):  # a minimum: moving any coordinate costs more
        for i in range(5):
            moved = median.clone()
            moved[i] += step
            assert cost(moved) > cost(median)
    assert (median - x.double().mean(0)).norm() > 5  # and not the mean


@pytest.mark.parametrize("decoder_bias", ["mean", "median"])
def test_tied_initialisation(decoder_bias):
    """The encoder is the dictionary's transpose and b_dec the data's centre, subtracted before encoding: the
    pre-activations are D^T (x - b_dec)."""
    torch.manual_seed(0)
    sae, x = SAE(8, 20, activation="topk", k=3), torch.randn(64, 8) + 5.0
    sae.init_tied_(x, decoder_bias)
    center = x.mean(0) if decoder_bias == "mean" else geometric_median(x)
    torch.testing.assert_close(sae.decoder.bias, center, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.encoder.weight, sae.dict_elements.T)
    torch.testing.assert_close(sae.encoder(x), (x - center) @ sae.dict_elements, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_input_scale_reads_and_writes_unscaled_activations_and_folds_exactly(activation):
    """An SAE with input_scale s works on s x and returns x_hat / s; its folded state (scale 1) gives the same x_hat
    from unscaled x, for every activation (thresholds and biases scaled by 1 / s), and so does its SAELens export."""
    torch.manual_seed(1)
    sae = SAE(8, 24, activation=activation, **ACTIVATIONS[activation])
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.5)
        sae.decoder.bias.normal_(0, 0.5)
        if activation == "jumprelu":
            sae.activation.threshold.uniform_(0.0, 0.6)
        if activation == "batchtopk":
            sae.activation.threshold.fill_(0.3)
    sae.eval()
    x = torch.randn(30, 8) * 40.0  # activations far from unit scale
    plain_x_hat, plain_code = sae(x / 40.0)
    sae.input_scale.fill_(1 / 40.0)
    x_hat, code = sae(x)
    torch.testing.assert_close(x_hat, plain_x_hat * 40.0, rtol=1e-5, atol=1e-4)  # x_hat in the input's units
    torch.testing.assert_close(code, plain_code)  # the code in the SAE's own
    folded = SAE(8, 24, activation=activation, **ACTIVATIONS[activation]).eval()
    folded.load_state_dict(sae.folded_state_dict())
    assert folded.input_scale.item() == 1.0
    torch.testing.assert_close(folded(x)[0], x_hat, rtol=1e-5, atol=1e-4)
    assert set(sae.state_dict()) == set(SAE(8, 24, activation=activation, **ACTIVATIONS[activation]).state_dict())


def test_a_file_from_before_input_normalisation_loads_with_scale_one():
    sae = SAE(8, 16)
    state = {k: v for k, v in sae.state_dict().items() if k != "input_scale"}
    sae.input_scale.fill_(3.0)
    sae.load_state_dict(state)
    assert sae.input_scale.item() == 1.0


def test_a_state_without_input_scale_loads_as_scale_one():
    """Files from before input normalisation hold no input_scale: the SAE reads it as 1 (interop.SAEFiles)."""
    old = {k: v for k, v in SAE(8, 16).state_dict().items() if k != "input_scale"}
    sae = SAE(8, 16)
    sae.input_scale.fill_(3.0)
    sae.load_state_dict(old)
    assert sae.input_scale.item() == 1.0


@pytest.mark.parametrize("activation, extra", [("relu", {}), ("topk", {"k": 4})])
def test_encode_then_decode_is_forward_with_an_input_scale(activation, extra):
    """decode returns x_hat in the units of x, as forward does: the input scale is undone on the way out."""
    torch.manual_seed(3)
    sae = SAE(8, 16, activation, **extra)
    sae.input_scale.fill_(2.5)
    x = torch.randn(5, 8)
    x_hat, code = sae(x)
    torch.testing.assert_close(sae.encode(x), code)
    torch.testing.assert_close(sae.decode(sae.encode(x)), x_hat)
