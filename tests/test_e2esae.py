"""e2esae.py: every loss and metric against the paper's formulas (e2esae.py's docstring; Braun et al. 2024, and the
reference library's code), computed independently here."""
import pytest
import torch
import torch.nn.functional as F

from e2esae import (
    SAE,
    FeatureCounts,
    LossConfig,
    ReLU,
    SAETransformer,
    compute_loss,
    explained_variance,
    output_metrics,
)
from language_models import Unembedding
from model import GPT, GPTConfig

V, D, L = 101, 32, 4


def cross_entropy(logits, idx):
    """Next-token cross-entropy: the logits at t predict token t + 1, averaged over positions."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), idx[:, 1:].flatten())


def small_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=L, n_embd=D, n_head=4, vocab_size=V, block_size=16)).eval()


def tokens(B=3, T=11, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- the formulas, written out independently ----

def ref_sae(x, sae):
    c = torch.relu(x @ sae.encoder.weight.T + sae.encoder.bias)
    W = sae.decoder.weight
    dictionary = W / torch.sqrt((W ** 2).sum(0, keepdim=True))
    return c @ dictionary.T + sae.decoder.bias, c


def ref_kl(new, orig):
    new, orig = new.reshape(-1, new.shape[-1]).double(), orig.reshape(-1, orig.shape[-1]).double()
    log_p_new, log_p_orig = torch.log_softmax(new, -1), torch.log_softmax(orig, -1)
    return (log_p_orig.exp() * (log_p_orig - log_p_new)).sum(-1).mean()


def ref_mse(a, b):
    return ((a.double() - b.double()) ** 2).mean()


def ref_streams(gpt, idx, replace=None):
    """Every residual index's stream (before any replacement there) and the logits, running blocks one by one."""
    replace = replace or {}
    x, seen = gpt.embed(idx), {}
    for r in range(gpt.config.n_layer + 1):
        seen[r] = x
        if r in replace:
            x = replace[r](x)
        if r < gpt.config.n_layer:
            x = gpt.transformer.h[r](x)
    return seen, gpt.lm_head(gpt.transformer.ln_f(x))


# ---- the small functions ----

@pytest.mark.parametrize("p", [1.0, 2.0])
@pytest.mark.parametrize("shape", [(5, 40), (2, 3, 24)])
def test_sparsity_is_the_p_norm_over_d_in(p, shape):
    c = torch.relu(torch.randn(shape))
    expected = (c.double().abs() ** p).sum(-1) ** (1 / p)
    torch.testing.assert_close(ReLU().penalty(c, None, p).mean().double() / 12, expected.mean() / 12, rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", [(7, 50), (2, 5, 33)])
def test_explained_variance_per_token(shape):
    target, pred = torch.randn(shape), torch.randn(shape)
    t, pr = target.reshape(-1, shape[-1]).double(), pred.reshape(-1, shape[-1]).double()
    mean = t.mean(0)
    expected = torch.stack([1 - ((pr[i] - t[i]) ** 2).sum() / ((t[i] - mean) ** 2).sum() for i in range(len(t))])
    torch.testing.assert_close(explained_variance(pred, target).double(), expected, rtol=1e-5, atol=1e-6)
    ln = lambda z: (z - z.mean(-1, keepdim=True)) / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + 1e-5)
    tl, pl = ln(t), ln(pr)
    expected_ln = 1 - ((pl - tl) ** 2).sum(-1) / ((tl - tl.mean(0)) ** 2).sum(-1)
    ev_ln = explained_variance(pred, target, layer_norm=True).double()
    torch.testing.assert_close(ev_ln, expected_ln, rtol=1e-4, atol=1e-5)


def test_output_metrics():
    idx = tokens(B=2, T=6)
    weight = torch.randn(V, 8)
    h_orig, h_new = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    orig, new = h_orig @ weight.T, h_new @ weight.T  # (2, 6, V)
    head = Unembedding(torch.arange(V), weight)  # every token its own row: the plain lm_head
    m = output_metrics(h_orig, h_new, idx, head, chunk_rows=5)  # chunks of 5 of the 12 positions
    def ce(logits):
        lp = torch.log_softmax(logits.double(), -1)
        return -torch.stack([lp[b, t, idx[b, t + 1]] for b in range(2) for t in range(5)]).mean()
    torch.testing.assert_close(m["ce_orig"].double(), ce(orig), rtol=1e-5, atol=0)
    torch.testing.assert_close(m["ce_increase"].double(), ce(new) - ce(orig), rtol=1e-4, atol=1e-6)
    p, q = torch.softmax(orig.double(), -1), torch.softmax(new.double(), -1)
    torch.testing.assert_close(m["stat_distance"].double(), 0.5 * (p - q).abs().sum(-1).mean(), rtol=1e-5, atol=0)
    assert abs(m["top1_consistency"] - (orig.argmax(-1) == new.argmax(-1)).double().mean()) < 1e-6
    assert abs(m["top1_acc_sae"] - (new[:, :-1].argmax(-1) == idx[:, 1:]).double().mean()) < 1e-6
    kl = (p * (p.log() - q.log())).sum(-1)  # (2, 6) per position
    torch.testing.assert_close(m["kl"].double(), kl.mean(), rtol=1e-5, atol=1e-7)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[:, 0] = keep[1, 3] = False  # positions left out (BOS): every figure over the others only
    m = output_metrics(h_orig, h_new, idx, head, keep=keep, chunk_rows=4)
    torch.testing.assert_close(m["kl"].double(), kl[keep].mean(), rtol=1e-5, atol=1e-7)
    predicted = keep[:, :-1]  # the kept positions that predict a next token
    lp = torch.log_softmax(orig.double(), -1)[:, :-1][predicted]  # (n, V)
    torch.testing.assert_close(m["ce_orig"].double(), -lp.gather(1, idx[:, 1:][predicted][:, None]).mean(),
                               rtol=1e-5, atol=0)


def test_sae_shapes_names_and_normalised_dictionary():
    sae = SAE(8, 20)
    assert {k: tuple(v.shape) for k, v in sae.state_dict().items()} == {
        "encoder.weight": (20, 8), "encoder.bias": (20,), "decoder.weight": (8, 20), "decoder.bias": (8,),
        "input_scale": ()}  # 1 unless the inputs are normalised (train.py's normalize_activations)
    torch.testing.assert_close(sae.dict_elements.norm(dim=0), torch.ones(20))
    with torch.no_grad():
        sae.decoder.weight.mul_(3.0)  # the normalisation is recomputed on every call
    x = torch.randn(4, 5, 8)
    x_hat, c = sae(x)
    rx, rc = ref_sae(x, sae)
    torch.testing.assert_close(x_hat, rx, rtol=1e-5, atol=1e-5)
    assert torch.equal(c, rc) and c.shape == (4, 5, 20)


# ---- compute_loss against an independent forward pass ----

POSITIONS = ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_post"]  # residual indices 1 and 3


@pytest.fixture
def model():
    torch.manual_seed(1)
    return SAETransformer(small_gpt(), POSITIONS, dict_size_to_input_ratio=2.5)


@pytest.mark.parametrize("p_norm", [1.0, 2.0])
def test_e2e_with_downstream_matches_the_formulas(model, p_norm):
    idx = tokens()
    coeffs = dict(sparsity_coeff=0.7, kl_coeff=0.5, in_to_orig_coeff=2.5, out_to_in_coeff=0.3, out_to_orig_coeff=0.2)
    ds = ["blocks.2.hook_resid_pre", "blocks.2.hook_resid_post", "blocks.3.hook_resid_pre"]
    loss, m = compute_loss(model, idx, LossConfig(p_norm=p_norm, in_to_orig_positions=ds, **coeffs))

    gpt = model.gpt
    with torch.no_grad():
        orig, logits_orig = ref_streams(gpt, idx)
        outs = {}
        def splice(p):
            def fn(x):
                outs[p] = (x, *ref_sae(x, model.sae(p)))
                return outs[p][1]
            return fn
        new, logits_new = ref_streams(gpt, idx, {1: splice(POSITIONS[0]), 3: splice(POSITIONS[1])})
    expected = 0.0
    for p, r in zip(POSITIONS, (1, 3)):
        x_in, x_hat, c = outs[p]
        sparsity = ((c.double().abs() ** p_norm).sum(-1) ** (1 / p_norm)).mean() / D
        expected += 0.7 * sparsity + 0.3 * ref_mse(x_hat, x_in) + 0.2 * ref_mse(x_hat, orig[r])
        torch.testing.assert_close(m[f"sparsity/{p}"].double(), sparsity, rtol=1e-5, atol=0)
        torch.testing.assert_close(m[f"out_to_in/{p}"].double(), ref_mse(x_hat, x_in), rtol=1e-4, atol=1e-7)
        assert abs(m[f"l0/{p}"] - (c > 0).sum(-1).double().mean()) < 1e-5
        assert abs(m[f"frac_zeros/{p}"] - (c == 0).double().mean()) < 1e-6
        torch.testing.assert_close(m[f"explained_variance/{p}"], explained_variance(x_hat, x_in).mean())
    # the second SAE read the stream the first one changed: chained
    assert not torch.allclose(outs[POSITIONS[1]][0], orig[3])
    for p, r in zip(ds, (2, 3, 3)):  # 3 holds an SAE: its spliced stream is that SAE's input
        expected += 2.5 / 3 * ref_mse(new[r], orig[r])
        torch.testing.assert_close(m[f"in_to_orig/{p}"].double(), ref_mse(new[r], orig[r]), rtol=1e-4, atol=1e-8)
    kl = ref_kl(logits_new, logits_orig)
    expected += 0.5 * kl
    torch.testing.assert_close(m["kl"].double(), kl, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-7)
    for key in ("ce_orig", "ce_sae", "ce_increase", "top1_acc_orig", "top1_acc_sae", "top1_consistency",
                "stat_distance", "explained_variance_ln/blocks.1.hook_resid_pre",
                "in_to_orig_explained_variance/blocks.2.hook_resid_pre"):
        assert key in m and m[key].dim() == 0
    torch.testing.assert_close(m["ce_orig"], cross_entropy(logits_orig, idx), rtol=1e-5, atol=1e-6)


def test_fused_kl_path_gives_the_same_loss_and_gradients(model):
    idx = tokens(seed=4)
    grads = []
    for full in (True, False):
        model.zero_grad()
        loss, m = compute_loss(model, idx, LossConfig(sparsity_coeff=1.0, kl_coeff=1.0), full_metrics=full)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.saes.parameters()]))
        assert ("ce_orig" in m) == full
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-7)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("full_metrics", [True, False])
def test_merged_unembedding_rows_are_exact(full_metrics):
    """Tokens with identical lm_head rows are merged into one logit plus log(multiplicity); every loss, gradient
    and metric equals the one computed over all the tokens (the same model with merging switched off)."""
    gpt = small_gpt(seed=3)
    plain = SAETransformer(gpt, POSITIONS).head  # distinct rows: the lm_head's own weight, as it is
    assert plain.weight is gpt.lm_head.weight and torch.equal(plain.token_row, torch.arange(V))
    with torch.no_grad():
        gpt.transformer.wte.weight[40:] = gpt.transformer.wte.weight[40]  # 61 tokens share a row, as unseen ones do
        gpt.transformer.wte.weight[12] = gpt.transformer.wte.weight[5]  # and two more share another
    torch.manual_seed(2)
    merged = SAETransformer(gpt, POSITIONS, dict_size_to_input_ratio=2.5)
    full = SAETransformer(gpt, POSITIONS, dict_size_to_input_ratio=2.5)
    full.saes.load_state_dict(merged.saes.state_dict())
    full.head = Unembedding(torch.arange(V), gpt.lm_head.weight)  # every token its own row: merging switched off
    assert merged.head.weight.shape == (V - 60 - 1, D)
    assert torch.equal(merged.head.bias.exp().round().sum(), torch.tensor(float(V)))
    idx = tokens(seed=5)
    idx[0, 3:7] = torch.tensor([40, 77, 5, 12])  # targets inside both merged rows
    coeffs = dict(sparsity_coeff=0.7, kl_coeff=0.5, in_to_orig_coeff=1.0,
                  in_to_orig_positions=["blocks.3.hook_resid_pre"])
    results = []
    for model in (merged, full):
        model.zero_grad()
        loss, m = compute_loss(model, idx, LossConfig(**coeffs), full_metrics=full_metrics)
        loss.backward()
        results.append((loss, m, [p.grad.clone() for p in model.saes.parameters()]))
    (loss_m, m_m, grads_m), (loss_f, m_f, grads_f) = results
    torch.testing.assert_close(loss_m, loss_f, rtol=1e-5, atol=1e-7)
    for a, b in zip(grads_m, grads_f):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert m_m.keys() == m_f.keys()
    for k in m_f:
        torch.testing.assert_close(m_m[k], m_f[k], rtol=1e-5, atol=1e-6, msg=k)
    if full_metrics:  # and the unmerged figures are the formulas' (as test_output_metrics checks them)
        with torch.no_grad():
            _, logits_orig = ref_streams(gpt, idx)
        torch.testing.assert_close(m_m["ce_orig"].double(), F.cross_entropy(logits_orig[:, :-1].flatten(0, 1).double(),
                                                                            idx[:, 1:].flatten()), rtol=1e-5, atol=0)


def test_local_saes_read_the_clean_stream(model):
    idx = tokens(seed=2)
    loss, m = compute_loss(model, idx, LossConfig(sparsity_coeff=0.4, out_to_in_coeff=1.0))
    with torch.no_grad():
        orig, _ = ref_streams(model.gpt, idx)
    expected = 0.0
    for p, r in zip(POSITIONS, (1, 3)):
        x_hat, c = ref_sae(orig[r], model.sae(p))
        expected += 0.4 * torch.linalg.vector_norm(c.double(), 1, -1).mean() / D + ref_mse(x_hat, orig[r])
        torch.testing.assert_close(m[f"out_to_in/{p}"].double(), ref_mse(x_hat, orig[r]), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-7)
    assert "kl" in m and "ce_increase" in m  # measured for the log all the same (chained spliced model)
    with torch.no_grad():
        torch.testing.assert_close(m["ce_sae"], cross_entropy(model(idx), idx))


def identity_sae(sae):
    """Weights with which the SAE reconstructs exactly: c = x + 100 on d_in codes, x_hat = c - 100."""
    d = sae.d_in
    with torch.no_grad():
        sae.encoder.weight.zero_()
        sae.encoder.bias.fill_(-1.0)
        sae.encoder.weight[:d].copy_(torch.eye(d))
        sae.encoder.bias[:d].fill_(100.0)
        sae.decoder.weight[:, :d].copy_(torch.eye(d))
        sae.decoder.bias.fill_(-100.0)


def test_a_perfect_sae_changes_nothing(model):
    for p in POSITIONS:
        identity_sae(model.sae(p))
    _, m = compute_loss(model, tokens(), LossConfig(sparsity_coeff=1.0, kl_coeff=1.0, in_to_orig_coeff=1.0,
                                                    in_to_orig_positions=["blocks.3.hook_resid_pre"]))
    assert m["kl"].abs() < 1e-6 and m["ce_increase"].abs() < 1e-4 and m["stat_distance"] < 1e-4
    assert m[f"out_to_in/{POSITIONS[0]}"] < 1e-8 and m["top1_consistency"] == 1.0
    assert m[f"l0/{POSITIONS[0]}"] == D


def count_block_calls(gpt):
    calls = [0] * gpt.config.n_layer
    for i, block in enumerate(gpt.transformer.h):
        block.register_forward_pre_hook(lambda mod, args, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def test_local_stops_after_the_last_sae_and_e2e_shares_the_prefix():
    model = SAETransformer(small_gpt(), ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"], 2.0)
    calls = count_block_calls(model.gpt)
    compute_loss(model, tokens(), LossConfig(sparsity_coeff=1.0, out_to_in_coeff=1.0), full_metrics=False)
    assert calls == [1, 1, 0, 0]  # the SAEs sit at indices 1 and 2: blocks 2 and 3 never run
    calls[:] = [0] * L
    compute_loss(model, tokens(), LossConfig(sparsity_coeff=1.0, kl_coeff=1.0))
    assert calls == [1, 2, 2, 2]  # block 0 is shared by the clean and the spliced pass


def test_only_saes_train():
    model = SAETransformer(small_gpt(), ["blocks.2.hook_resid_pre"], 2.0)
    before = {k: v.clone() for k, v in model.gpt.state_dict().items()}
    sae_before = [p.clone() for p in model.saes.parameters()]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss, _ = compute_loss(model, tokens(), LossConfig(sparsity_coeff=1.0, kl_coeff=1.0, in_to_orig_coeff=1.0,
                                                    in_to_orig_positions=["blocks.3.hook_resid_pre"]))
    loss.backward()
    assert all(p.grad is None for p in model.gpt.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.saes.parameters())
    opt.step()
    assert all(torch.equal(v, model.gpt.state_dict()[k]) for k, v in before.items())
    assert all(not torch.equal(a, b) for a, b in zip(sae_before, model.saes.parameters()))


def test_save_and_load_round_trip(tmp_path, model):
    path = str(tmp_path / "saes.safetensors")
    model.save(path, config={"sparsity_coeff": 3.0})
    again = SAETransformer.from_checkpoint(path, gpt=model.gpt)
    assert again.sae_positions == model.sae_positions and again.config == {"sparsity_coeff": 3.0}
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(model(idx), again(idx))
        for p in POSITIONS:
            x = torch.randn(2, 5, D)
            assert all(torch.equal(a, b) for a, b in zip(model.sae(p)(x), again.sae(p)(x)))


def test_feature_counts():
    model = SAETransformer(small_gpt(), ["blocks.1.hook_resid_pre"], 2.0)
    counts = FeatureCounts(model)
    idx = tokens()
    compute_loss(model, idx, LossConfig(sparsity_coeff=1.0, kl_coeff=1.0), feature_counts=counts)
    with torch.no_grad():
        orig, _ = ref_streams(model.gpt, idx)
        _, c = ref_sae(orig[1], model.sae("blocks.1.hook_resid_pre"))
    fired = (c > 0).reshape(-1, c.shape[-1])
    assert counts.n_tokens["blocks.1.hook_resid_pre"] == 33
    assert counts.alive()["blocks.1.hook_resid_pre"] == int(fired.any(0).sum())
    torch.testing.assert_close(counts.frequencies()["blocks.1.hook_resid_pre"], fired.double().mean(0))


# ---- bad input ----

def test_bad_inputs_raise(model):
    idx = tokens()
    with pytest.raises(ValueError, match="kl_coeff must be >= 0"):
        compute_loss(model, idx, LossConfig(sparsity_coeff=1.0, kl_coeff=-1.0))
    for sparsity in (0.0, 1.0):  # sparsity alone (or nothing at all) has nothing to reconstruct
        with pytest.raises(ValueError, match="nothing asks the SAEs to reconstruct anything"):
            compute_loss(model, idx, LossConfig(sparsity_coeff=sparsity))
    with pytest.raises(ValueError, match=r"unknown residual position 'blocks\.9\.hook_resid_pre'"):
        compute_loss(model, idx, LossConfig(sparsity_coeff=1.0, in_to_orig_coeff=1.0,
                                                  in_to_orig_positions=["blocks.9.hook_resid_pre"]))
    for p in ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"):  # before the first SAE, and at it: always 0
        with pytest.raises(ValueError, match="is not after the first SAE.*the term is always 0"):
            compute_loss(model, idx, LossConfig(sparsity_coeff=1.0, in_to_orig_coeff=1.0, in_to_orig_positions=[p]))
    with pytest.raises(ValueError, match="needs in_to_orig_positions"):
        compute_loss(model, idx, LossConfig(sparsity_coeff=1.0, in_to_orig_coeff=1.0))
    with pytest.raises(ValueError, match="integer tensor of shape"):
        compute_loss(model, idx.float(), LossConfig(sparsity_coeff=1.0, kl_coeff=1.0))
    with pytest.raises(ValueError, match="integer tensor of shape"):
        compute_loss(model, idx[0], LossConfig(sparsity_coeff=1.0, kl_coeff=1.0))
    with pytest.raises(ValueError, match="p_norm must be positive"):
        compute_loss(model, idx, LossConfig(sparsity_coeff=1.0, kl_coeff=1.0, p_norm=0.0))
    with pytest.raises(ValueError, match=r"unknown residual position 'blocks\.4\.hook_resid_pre'.*blocks\.\{0\.\.3\}"):
        SAETransformer(small_gpt(), ["blocks.4.hook_resid_pre"])
    with pytest.raises(ValueError, match="the same place"):
        SAETransformer(small_gpt(), ["blocks.1.hook_resid_post", "blocks.2.hook_resid_pre"])
    with pytest.raises(ValueError, match="non-empty list"):
        SAETransformer(small_gpt(), "blocks.1.hook_resid_pre")
