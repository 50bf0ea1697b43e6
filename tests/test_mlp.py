"""mlp.py: the shipped digits, the loss against e2esae.py's formulas written out here, a frozen MLP, whole runs."""
import copy
import json
import os
import re
import types

import pytest
import torch

import mlp
from configurator import ConfigError, configure
from e2esae import SAE

REDUCED = ["--hidden_sizes=[16, 16]", "--mlp_epochs=2", "--dict_size_to_input_ratio=2.0", "--n_steps=12",
           "--batch_size=16", "--warmup_steps=2", "--log_every_n_steps=6"]


def test_the_shipped_digits_are_the_uci_test_set_split_one_in_five():
    pixels, labels = mlp.load_digits()
    assert pixels.shape == (1797, 64) and pixels.min() == 0 and pixels.max() == 1
    # the class counts of UCI's optdigits.tes
    assert torch.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    (train_x, train_y), (test_x, test_y) = mlp.split(pixels, labels)
    assert len(train_y) == 1437 and len(test_y) == 360
    assert torch.equal(test_x, pixels[::5]) and torch.equal(train_x[:4], pixels[[1, 2, 3, 4]])


# ---- the loss, written out independently ----

def ref_linear(x, layer):
    return x @ layer.weight.T + layer.bias


def ref_terms(net, sae, sae_layer, pixels, p):
    """sparsity, out_to_in, kl, and the MSE at each later hidden layer, in float64 from the weights."""
    net, sae, x = copy.deepcopy(net).double(), copy.deepcopy(sae).double(), pixels.double()
    hidden_orig, h = [], x
    for layer in net.layers[:-1]:
        h = torch.relu(ref_linear(h, layer))
        hidden_orig.append(h)
    logits_orig = ref_linear(h, net.layers[-1])
    a = hidden_orig[sae_layer]
    c = torch.relu(ref_linear(a, sae.encoder))
    W = sae.decoder.weight
    a_hat = c @ (W / torch.sqrt((W ** 2).sum(0, keepdim=True))).T + sae.decoder.bias
    h, later_new = a_hat, []
    for layer in net.layers[sae_layer + 1:-1]:
        h = torch.relu(ref_linear(h, layer))
        later_new.append(h)
    logits_new = ref_linear(h, net.layers[-1])
    log_p_new, log_p_orig = torch.log_softmax(logits_new, -1), torch.log_softmax(logits_orig, -1)
    return {"sparsity": ((c.abs() ** p).sum(-1) ** (1 / p)).mean() / a.shape[-1],
            "out_to_in": ((a_hat - a) ** 2).mean(),
            "kl": (log_p_orig.exp() * (log_p_orig - log_p_new)).sum(-1).mean(),
            "in_to_orig": [((new - orig) ** 2).mean() for new, orig in zip(later_new, hidden_orig[sae_layer + 1:])]}


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_the_loss_is_the_reference_sum_of_terms(p):
    torch.manual_seed(0)
    net = mlp.MLP([64, 24, 20, 18, 10]).requires_grad_(False)  # two hidden layers after the SAE's
    sae = SAE(24, 56)
    with torch.no_grad():
        sae.encoder.bias.add_(0.3)  # some codes active
    pixels = torch.rand(37, 64)
    coeffs = dict(sparsity_coeff=0.7, kl_coeff=1.3, in_to_orig_coeff=2.0, out_to_in_coeff=0.4)
    loss, terms = mlp.sae_loss(mlp.spliced_run(net, sae, 0, pixels), sae, **coeffs, p_norm=p)
    ref = ref_terms(net, sae, 0, pixels, p)
    assert len(ref["in_to_orig"]) == 2
    expected = (0.7 * ref["sparsity"] + 0.4 * ref["out_to_in"] + 1.3 * ref["kl"]
                + 2.0 / 2 * sum(ref["in_to_orig"]))  # the downstream coefficient split evenly over the two layers
    assert ref["kl"] > 1e-3 and all(t > 1e-4 for t in ref["in_to_orig"])
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    for name in ("sparsity", "out_to_in", "kl"):
        torch.testing.assert_close(terms[name].double(), ref[name], rtol=1e-5, atol=1e-7)
    # each type is its terms and nothing else
    local, _ = mlp.sae_loss(mlp.spliced_run(net, sae, 0, pixels), sae, sparsity_coeff=0.7,
                            out_to_in_coeff=0.4, p_norm=p)
    torch.testing.assert_close(local.double(), 0.7 * ref["sparsity"] + 0.4 * ref["out_to_in"], rtol=1e-5, atol=1e-7)


def test_only_the_sae_trains():
    c = types.SimpleNamespace(**configure(mlp.DEFAULTS, REDUCED))
    (train_x, train_y), _ = mlp.split(*mlp.load_digits())
    net = mlp.train_mlp(train_x, train_y, c)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    sae = mlp.train_sae(net, train_x, mlp.loss_coeffs(c, "e2e+ds"), c)
    torch.manual_seed(c.seed)
    initial = SAE(16, 32)  # train_sae's SAE before training: same seed, same shapes
    assert all(not p.requires_grad and p.grad is None for p in net.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not torch.equal(sae.encoder.weight, initial.encoder.weight)
    assert not torch.equal(sae.decoder.weight, initial.decoder.weight)


# ---- whole runs ----

def test_a_reduced_run_prints_every_type_and_is_reproducible(capsys):
    rows = mlp.main(REDUCED)
    out = capsys.readouterr().out
    assert [r["type"] for r in rows] == ["local", "e2e", "e2e+ds"]
    table = out[out.index("held-out results"):].splitlines()
    assert table[1].split("|")[0].strip() == "type"
    for kind, line in zip(("local", "e2e", "e2e+ds"), table[2:5]):
        cells = [cell.strip() for cell in line.split("|")]
        assert cells[0] == kind and cells[3].endswith("/32") and len(cells) == 12  # with the EV at hidden layer 1
    assert out.count(" step 6 | loss ") == 3 and out.count(" step 12 | loss ") == 3  # each type's log
    for r in rows:
        assert 0 <= r["alive"] <= r["n_dict"] == 32 and 0 <= r["l0"] <= 32
        assert r["acc_orig"] == rows[0]["acc_orig"] and r["kl"] >= 0
        assert r["ce_increase"] == pytest.approx(r["ce_sae"] - r["ce_orig"])
    assert mlp.main(REDUCED) == rows  # same seed, same figures


def test_a_sweep_writes_the_pareto_plot_and_every_row(tmp_path, capsys):
    rows = mlp.main([*REDUCED, "--training_types=['local', 'e2e']", "--local_sparsity_coeff=0.5",
                     "--e2e_sparsity_coeff=3", "--sweep=True", "--sweep_factors=[0.5, 2]", f"--out_dir={tmp_path}"])
    assert [(r["type"], r["sparsity_coeff"]) for r in rows] == [("local", 0.25), ("local", 1.0), ("e2e", 1.5),
                                                                 ("e2e", 6.0)]
    assert os.path.getsize(tmp_path / "mlp_pareto.png") > 10_000
    with open(tmp_path / "mlp_sweep.json") as f:
        assert json.load(f)["rows"] == rows


@pytest.mark.parametrize("args, message", [
    (["--sae_layer=2"], "sae_layer must name a hidden layer, 0 to 1"),
    (["--sae_layer=1"], "e2e+ds reconstructs the hidden layers after the SAE's"),
    (["--training_types=['local', 'e2e_ds']"], "training_types must be some of"),
    (["--hidden_sizes=[]"], "hidden_sizes must be a non-empty list"),
    (["--n_steps=0"], "n_steps must be positive"),
    (["--e2e_sparsity_coeff=-1"], "e2e_sparsity_coeff must be >= 0"),
    (["--out_to_in_coeff=0", "--local_sparsity_coeff=0"], "local: out_to_in_coeff=0 leaves only the sparsity term"),
    (["--sweep=True", "--sweep_factors=[]"], "sweep_factors must be a non-empty list"),
    (["--sparsity_coeff=1"], "unknown key 'sparsity_coeff'"),
    (["--n_steps=1.5"], "n_steps expects int"),
])
def test_a_bad_setting_fails_before_any_work(args, message, capsys):
    with pytest.raises(ConfigError, match=re.escape(message)):
        mlp.main(args)
    assert capsys.readouterr().out == ""  # not even the config: nothing ran
