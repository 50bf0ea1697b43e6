"""train.py with the SAE variants, pretrained SAEs and the short end-to-end fine-tune, on a tiny random GPT-2 and
local text: every activation under every training type as a user types it, the settings each refuses, pretrained
SAEs kept fixed or trained further, and the fine-tune's two phases."""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import train
from configurator import ConfigError
from conftest import ROOT
from conftest import args as run_args
from e2esae import SAETransformer
from language_models import save_pretrained
from model import GPT, GPTConfig


@pytest.fixture(scope="module")
def gpt_dir(gpt3_dir):
    return gpt3_dir  # the 3-layer model (tests/conftest.py)


def args(gpt_dir, text_dir, out_dir, **overrides):
    """conftest's 12 steps, evaluated and saved once, at the end."""
    return run_args(gpt_dir, text_dir, out_dir, **{"eval_every_n_samples": 48, "save_every_n_samples": 48,
                                                   "kl_coeff": 1.0, **overrides})


TYPES = {"local": dict(kl_coeff=0.0, out_to_in_coeff=1.0), "e2e": dict(kl_coeff=1.0),
         "e2e+ds": dict(kl_coeff=0.5, in_to_orig_coeff=1.0, in_to_orig_positions=["blocks.2.hook_resid_pre"])}
ACTIVATIONS = {"relu": dict(), "topk": dict(k=4), "batchtopk": dict(k=4), "jumprelu": dict(sparsity_coeff=0.1)}


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_under_every_training_type(activation, kind, gpt_dir, text_dir, tmp_path, capsys):
    train.main(args(gpt_dir, text_dir, tmp_path, activation=activation, **ACTIVATIONS[activation], **TYPES[kind]))
    out = capsys.readouterr().out
    assert f"training type: {kind}" in out and "L0 at blocks.1.hook_resid_pre" in out
    model = SAETransformer.from_checkpoint(str(tmp_path / "saes.safetensors"))
    sae = model.sae("blocks.1.hook_resid_pre")
    assert sae.settings["activation"] == activation  # the checkpoint records the activation
    if activation == "topk":
        assert sae.activation.k == 4 and "L0 at blocks.1.hook_resid_pre                  4.0" in out
    if activation in ("topk", "batchtopk"):  # k sets the sparsity: no L_p term unless given
        assert "sparsity_coeff=0 (give it to add an L_p term)" in out
        if kind == "local":  # dead elements revived by the auxiliary-k loss where the loss reconstructs x
            assert "aux_k_coeff=0.03125" in out and " | dead " in out
        else:  # not on a KL loss: there it hurt (RESULTS.md)
            assert "aux_k_coeff=0: the auxiliary-k loss reconstructs x - x_hat" in out and " | dead " not in out
    if activation == "batchtopk":  # the threshold was estimated in training and saved for inference
        assert sae.activation.threshold.item() > 0
    weights = load_file(str(tmp_path / "saes.safetensors")).values()
    assert torch.isfinite(torch.cat([t.flatten() for t in weights])).all()


def test_topk_as_typed_on_the_command_line(gpt_dir, text_dir, tmp_path):
    argv = [*args(gpt_dir, text_dir, tmp_path), "--activation=topk", "--k=16"]
    r = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "activation=topk: k=16 sets the sparsity" in r.stdout


@pytest.mark.parametrize("overrides, message", [
    (dict(activation="topk"), "activation='topk' needs k, the active codes per token: e.g. --k=32"),
    (dict(k=8), "k=8 is the active codes per token of topk and batchtopk; activation='relu'"),
    (dict(activation="jumprelu", k=8), "activation='jumprelu' has no k (its sparsity comes from the sparsity"),
    (dict(jumprelu_bandwidth=0.1), "jumprelu_bandwidth is JumpReLU's; activation='relu' has none"),
    (dict(activation="jumprelu", p_norm=2.0), "p_norm does nothing"),
    (dict(dead_window_tokens=1000), "aux_k_coeff is 0"),
    (dict(activation="topk", k=500), "k=500: TopK needs k, the codes it keeps per token, an int from 1 to n_dict=128"),
    (dict(kl_rescale=True), "kl_rescale scales the KL term to the local MSE's size"),
    (dict(finetune_fraction=0.1, kl_coeff=0.0, out_to_in_coeff=1.0), "finetune_fraction fine-tunes end to end"),
    (dict(finetune_fraction=0.02), "finetune_fraction=0.02 of 12 steps rounds to no end-to-end step"),
    (dict(retrain_saes=True), "retrain_saes=True trains pretrained SAEs further, and pretrained_sae_paths is empty"),
    (dict(sparsity_coeff=0.0, p_norm=2.0), "p_norm shapes the sparsity term, whose sparsity_coeff is 0"),
])
def test_settings_that_would_do_nothing_are_refused(overrides, message, gpt_dir, text_dir, tmp_path):
    with pytest.raises(ConfigError) as e:
        train.main(args(gpt_dir, text_dir, tmp_path / "out", **overrides))
    assert message in str(e.value.code)
    assert not (tmp_path / "out").exists()


# ---- pretrained SAEs ----

def test_a_pretrained_sae_kept_fixed_while_a_new_one_trains(gpt_dir, text_dir, tmp_path, capsys):
    train.main(args(gpt_dir, text_dir, tmp_path / "first"))  # an e2e SAE at blocks.1
    first = load_file(str(tmp_path / "first" / "saes.safetensors"))
    train.main(args(gpt_dir, text_dir, tmp_path / "second", sae_positions=["blocks.2.hook_resid_pre"],
                    pretrained_sae_paths=[str(tmp_path / "first")], activation="topk", k=4))
    out = capsys.readouterr().out
    assert (f"pretrained SAE at blocks.1.hook_resid_pre from {tmp_path / 'first'} (relu, kept fixed); its position "
            "is added to sae_positions") in out
    second = load_file(str(tmp_path / "second" / "saes.safetensors"))
    for k, v in first.items():  # the pretrained SAE is exactly as it was
        assert torch.equal(second[k], v), k
    model = SAETransformer.from_checkpoint(str(tmp_path / "second" / "saes.safetensors"))
    assert model.sae_positions == ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"]
    assert [model.sae(p).settings["activation"] for p in model.sae_positions] == ["relu", "topk"]  # each its own
    ckpt = torch.load(tmp_path / "second" / "ckpt.pt", weights_only=True)
    assert ckpt["sources"] == {"blocks.1.hook_resid_pre": str(tmp_path / "first"),
                               "blocks.2.hook_resid_pre": "trained here"}
    # resume keeps working: the finished run, resumed, still reports
    train.main(args(gpt_dir, text_dir, tmp_path / "second", sae_positions=["blocks.2.hook_resid_pre"],
                    pretrained_sae_paths=[str(tmp_path / "first")], activation="topk", k=4, resume=True))


def test_a_pretrained_sae_retrained_starts_from_its_weights(gpt_dir, text_dir, tmp_path):
    train.main(args(gpt_dir, text_dir, tmp_path / "first", kl_coeff=0.0, out_to_in_coeff=1.0))  # local
    first = load_file(str(tmp_path / "first" / "saes.safetensors"))
    train.main(args(gpt_dir, text_dir, tmp_path / "tuned", pretrained_sae_paths=[str(tmp_path / "first")],
                    retrain_saes=True, lr=1e-7, warmup_samples=0))  # trained further, at a tiny learning rate
    tuned = load_file(str(tmp_path / "tuned" / "saes.safetensors"))
    fresh = load_file(str(tmp_path / "first" / "saes.safetensors"))
    for k, v in first.items():
        assert not torch.equal(tuned[k], v) or k.endswith(("bias", "input_scale")), k  # it trained...
        torch.testing.assert_close(tuned[k], v, rtol=0, atol=1e-4)  # ...from the pretrained weights
    assert fresh.keys() == tuned.keys()


def test_pretrained_mismatches_are_refused_with_both_shapes(gpt_dir, text_dir, tmp_path):
    train.main(args(gpt_dir, text_dir, tmp_path / "first"))
    with pytest.raises(ConfigError, match=r"has an SAE of 128 elements x 32 at blocks.1.hook_resid_pre; this run's "
                                          r"SAEs are 256 x 32 \(dict_size_to_input_ratio=8\): set "
                                          r"dict_size_to_input_ratio=4"):
        train.main(args(gpt_dir, text_dir, tmp_path / "other", pretrained_sae_paths=[str(tmp_path / "first")],
                        dict_size_to_input_ratio=8.0))
    wide = tmp_path / "wide_gpt"
    torch.manual_seed(1)
    save_pretrained(GPT(GPTConfig(n_layer=3, n_embd=48, n_head=4, block_size=64)), str(wide))
    with pytest.raises(ConfigError, match=r"the SAE at blocks.1.hook_resid_pre reads activations of width 32, but "
                                          r"the model is 48 wide"):
        train.main(args(str(wide), text_dir, tmp_path / "wide", pretrained_sae_paths=[str(tmp_path / "first")]))
    with pytest.raises(ConfigError, match="is not a directory|does not exist"):
        train.main(args(gpt_dir, text_dir, tmp_path / "none", pretrained_sae_paths=[str(tmp_path / "nowhere")]))
    with pytest.raises(ConfigError, match="nothing to train"):
        train.main(args(gpt_dir, text_dir, tmp_path / "fixed", pretrained_sae_paths=[str(tmp_path / "first")]))
    assert not any((tmp_path / d).exists() for d in ("other", "wide", "none", "fixed"))


# ---- the short end-to-end fine-tune ----

def test_finetune_trains_locally_then_end_to_end(gpt_dir, text_dir, tmp_path, capsys):
    train.main(args(gpt_dir, text_dir, tmp_path, activation="topk", k=4, kl_coeff=1.0, out_to_in_coeff=1.0,
                    kl_rescale=True, finetune_fraction=0.25, n_samples=64, log_every_n_steps=1))
    out = capsys.readouterr().out
    assert "training type: local for steps 1-12, then e2e for steps 13-16 (finetune_fraction)" in out
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(steps) == 16
    assert all(" kl " not in s for s in steps[:12]) and all(" kl " in s for s in steps[12:])


def test_the_finetune_recipe_config_resolves():
    config, notes = train.settings([os.path.join(ROOT, "config", "finetune_topk.py")])
    resolved = (config["activation"], config["k"], config["sparsity_coeff"], config["kl_rescale"])
    assert resolved == ("topk", 16, 0.0, True)
    assert train.schedule(SimpleNamespace(**config), world_size=1)[3] == 115  # local steps of 2,048 / 16 = 128
    assert any("aux_k_coeff=0.03125" in n for n in notes)
