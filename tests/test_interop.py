"""interop.py: every checkpoint format. The reference library's (its run directories, the hub's name.pt + name.yaml
and its loading API), SAELens's for every activation (checked against sae_lens itself where it is installed), this
project's own, the messages for the specs users get wrong, and the remote loaders' offline failures. The files are
written here exactly as those libraries lay them out."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

from e2esae import SAE, SAETransformer
from interop import checkpoint_kind, read_checkpoint, save_saelens
from language_models import save_pretrained
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POS = "blocks.1.hook_resid_pre"


def small_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=3, n_embd=32, n_head=4, vocab_size=50257, block_size=64)).eval()


def tokens(B=2, T=12, seed=0):
    return torch.randint(0, 50257, (B, T), generator=torch.Generator().manual_seed(seed))


def randomise(sae, seed):
    """Weights unlike a fresh SAE's: decoder columns far from unit norm, non-zero biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.randn(sae.encoder.weight.shape, generator=g) * 0.3)
        sae.encoder.bias.copy_(torch.randn(sae.n_dict, generator=g) * 0.1)
        sae.decoder.weight.copy_(torch.randn(sae.decoder.weight.shape, generator=g) * 2.0)
        sae.decoder.bias.copy_(torch.randn(sae.d_in, generator=g))
    return sae


# the settings each activation is tested with, and the architecture SAELens gets it as
SETTINGS = {"relu": {}, "topk": {"k": 5}, "batchtopk": {"k": 5}, "jumprelu": {}}
ARCHITECTURE = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}


def trained_like(sae, seed):
    """randomise, and thresholds as training leaves them: BatchTopK's estimated over training-mode batches,
    JumpReLU's one per element. Returned in inference mode."""
    randomise(sae, seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        if sae.activation.name == "batchtopk":
            sae.train()
            for _ in range(200):
                sae(torch.randn(16, sae.d_in, generator=g))
            assert sae.activation.threshold > 0
        if sae.activation.name == "jumprelu":
            sae.activation.threshold.copy_(torch.rand(sae.n_dict, generator=g))
    return sae.eval()


def ref_sae(x, W_enc, b_enc, W_dec, b_dec):
    """The SAE as the reference library computes it, from its raw tensors (W_enc (n, d), W_dec (d, n))."""
    c = torch.relu(x @ W_enc.T + b_enc)
    return c @ (W_dec / W_dec.norm(dim=0, keepdim=True)).T + b_dec


# ---- the reference library's checkpoints ----

def write_reference_run(directory, positions_in_config, loss):
    """final_config.yaml with the reference's keys, and two samples_{N}.pt with different weights."""
    os.makedirs(directory, exist_ok=True)
    config = {"wandb_project": "gpt2-e2e", "seed": 0, "tlens_model_name": "gpt2-small", "tlens_model_path": None,
              "n_samples": 400_000, "lr": 5e-4, "loss": loss,
              "train_data": {"dataset_name": "apollo-research/Skylion007-openwebtext-tokenizer-gpt2", "n_ctx": 1024},
              "saes": {"retrain_saes": False, "pretrained_sae_paths": None, "sae_positions": positions_in_config,
                       "dict_size_to_input_ratio": 2.0}}
    with open(os.path.join(directory, "final_config.yaml"), "w") as f:
        yaml.safe_dump(config, f)
    raw = {}
    for n, seed in ((500, 1), (2000, 2)):  # 2000 is the newest, though "samples_500" sorts after it as text
        sae = randomise(SAE(32, 64), seed)
        raw[n] = {"blocks-1-hook_resid_pre.encoder.0.weight": sae.encoder.weight.detach().clone(),
                  "blocks-1-hook_resid_pre.encoder.0.bias": sae.encoder.bias.detach().clone(),
                  "blocks-1-hook_resid_pre.decoder.weight": sae.decoder.weight.detach().clone(),
                  "blocks-1-hook_resid_pre.decoder.bias": sae.decoder.bias.detach().clone()}
        torch.save(raw[n], os.path.join(directory, f"samples_{n}.pt"))
    return raw


E2E_DS_LOSS = {"sparsity": {"p_norm": 1.0, "coeff": 1.5},
               "in_to_orig": {"hook_positions": ["blocks.2.hook_resid_pre"], "total_coeff": 2.5},
               "out_to_orig": None, "out_to_in": {"coeff": 0.0}, "logits_kl": {"coeff": 0.5}}


@pytest.mark.parametrize("positions_in_config", [[POS], POS])  # a list or a single string, as the reference allows
def test_reference_checkpoint_loads_the_newest_and_reproduces_it(tmp_path, positions_in_config):
    raw = write_reference_run(str(tmp_path / "run"), positions_in_config, E2E_DS_LOSS)
    gpt = small_gpt()
    model = SAETransformer.from_checkpoint(str(tmp_path / "run"), gpt=gpt)
    assert model.sae_positions == [POS]
    idx = tokens()
    x = gpt.run_blocks(gpt.embed(idx), 0, 1)
    w = {k.split(".", 1)[1]: v for k, v in raw[2000].items()}
    expected = ref_sae(x, w["encoder.0.weight"], w["encoder.0.bias"], w["decoder.weight"], w["decoder.bias"])
    torch.testing.assert_close(model.sae(POS)(x)[0], expected, rtol=1e-5, atol=1e-5)
    expected_logits = gpt(idx, edits={POS: lambda s: ref_sae(s, w["encoder.0.weight"], w["encoder.0.bias"],
                                                               w["decoder.weight"], w["decoder.bias"])})
    torch.testing.assert_close(model(idx), expected_logits, rtol=1e-5, atol=1e-5)
    assert model.config["sparsity_coeff"] == 1.5 and model.config["p_norm"] == 1.0
    assert model.config["kl_coeff"] == 0.5 and model.config["in_to_orig_coeff"] == 2.5
    assert model.config["in_to_orig_positions"] == ["blocks.2.hook_resid_pre"]
    assert model.config["out_to_in_coeff"] == 0.0 and model.config["out_to_orig_coeff"] == 0.0
    assert model.config["init_from"] == "gpt2-small"  # TransformerLens's name, as the file writes it


def test_reference_checkpoint_from_one_file_and_missing_sections(tmp_path):
    raw = write_reference_run(str(tmp_path / "run"), [POS], {"sparsity": {"coeff": 4.0}, "out_to_in": {"coeff": 1.0}})
    gpt = small_gpt()
    model = SAETransformer.from_checkpoint(str(tmp_path / "run" / "samples_500.pt"), gpt=gpt)  # that file, not newest
    torch.testing.assert_close(model.sae(POS).decoder.weight, raw[500]["blocks-1-hook_resid_pre.decoder.weight"])
    assert model.config["sparsity_coeff"] == 4.0 and model.config["out_to_in_coeff"] == 1.0
    assert model.config["kl_coeff"] == 0.0 and model.config["in_to_orig_coeff"] == 0.0  # absent: 0
    assert model.config["in_to_orig_positions"] == []


def test_reference_checkpoint_errors(tmp_path):
    write_reference_run(str(tmp_path / "run"), ["blocks.2.hook_resid_pre"], E2E_DS_LOSS)
    with pytest.raises(ValueError, match="places them at"):  # the weights sit at blocks.1, the config says blocks.2
        SAETransformer.from_checkpoint(str(tmp_path / "run"), gpt=small_gpt())
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"samples_\{N\}\.pt"):
        SAETransformer.from_local_path(str(tmp_path / "empty"), gpt=small_gpt())
    write_reference_run(str(tmp_path / "other"), [POS], E2E_DS_LOSS)
    config_path = tmp_path / "other" / "final_config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["tlens_model_name"] = "pythia-14m"
    config_path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="(?s)'pythia-14m', could not be loaded .* pass the model as gpt="):
        SAETransformer.from_checkpoint(str(tmp_path / "other"))


def test_from_local_path_checkpoint_dir_uses_the_newest_samples(tmp_path):
    """The reference library's SAETransformer.from_local_path(checkpoint_dir=...), given a Path as its users do."""
    raw = write_reference_run(str(tmp_path / "run"), [POS], E2E_DS_LOSS)
    model = SAETransformer.from_local_path(checkpoint_dir=tmp_path / "run", gpt=small_gpt())
    for k, v in raw[2000].items():  # samples_2000.pt, not samples_500.pt (the larger N, not the later name)
        torch.testing.assert_close(model.saes.state_dict()[k.replace(".encoder.0.", ".encoder.")], v, rtol=0, atol=0)
    assert model.config["kl_coeff"] == 0.5 and model.config["in_to_orig_coeff"] == 2.5


HUB_REPO, HUB_NAME, HUB_POS = "apollo-research/e2e-saes-gpt2", "e2e_similar_ce_layer_6", "blocks.6.hook_resid_pre"


def deep_gpt():
    """A random GPT with a block 6, where the hub's layer-6 SAEs sit."""
    torch.manual_seed(1)
    return GPT(GPTConfig(n_layer=8, n_embd=32, n_head=4, vocab_size=50257, block_size=64)).eval()


def write_hub_pair(directory):
    """The hub's layout (apollo-research/e2e-saes-gpt2): name.pt, the reference's state dict of the one SAE, beside
    name.yaml, its whole training config (an e2e run: no in_to_orig or out_to_orig term, written as null)."""
    os.makedirs(directory)
    config = {"wandb_project": "gpt2-e2e", "wandb_run_name": None, "seed": 0, "tlens_model_name": "gpt2",
              "tlens_model_path": None, "n_samples": 400_000, "batch_size": 8, "effective_batch_size": 16,
              "lr": 5e-4, "lr_schedule": "cosine", "warmup_samples": 20_000, "max_grad_norm": 10.0,
              "loss": {"sparsity": {"p_norm": 1.0, "coeff": 0.8}, "in_to_orig": None, "out_to_orig": None,
                       "out_to_in": {"coeff": 0.0}, "logits_kl": {"coeff": 1.0}},
              "train_data": {"dataset_name": "apollo-research/Skylion007-openwebtext-tokenizer-gpt2",
                             "is_tokenized": True, "tokenizer_name": "gpt2", "streaming": True, "split": "train",
                             "n_ctx": 1024, "column_name": "input_ids"},
              "saes": {"retrain_saes": False, "pretrained_sae_paths": None, "sae_positions": [HUB_POS],
                       "dict_size_to_input_ratio": 2.0}}
    with open(os.path.join(directory, f"{HUB_NAME}.yaml"), "w") as f:
        yaml.safe_dump(config, f)
    sae = randomise(SAE(32, 64), 12)
    raw = {"blocks-6-hook_resid_pre.encoder.0.weight": sae.encoder.weight.detach().clone(),
           "blocks-6-hook_resid_pre.encoder.0.bias": sae.encoder.bias.detach().clone(),
           "blocks-6-hook_resid_pre.decoder.weight": sae.decoder.weight.detach().clone(),
           "blocks-6-hook_resid_pre.decoder.bias": sae.decoder.bias.detach().clone()}
    torch.save(raw, os.path.join(directory, f"{HUB_NAME}.pt"))
    return {k.split(".", 1)[1]: v for k, v in raw.items()}


def test_the_hubs_pair_loads_with_from_local_path_and_load_checkpoint(tmp_path):
    w = write_hub_pair(str(tmp_path / "hub"))
    pt, config = tmp_path / "hub" / f"{HUB_NAME}.pt", tmp_path / "hub" / f"{HUB_NAME}.yaml"
    gpt, idx = deep_gpt(), tokens()
    expected = gpt(idx, edits={HUB_POS: lambda s: ref_sae(s, w["encoder.0.weight"], w["encoder.0.bias"],
                                                        w["decoder.weight"], w["decoder.bias"])})
    model = SAETransformer.from_local_path(checkpoint_file=pt, config_file=config, gpt=gpt)
    assert model.sae_positions == [HUB_POS] and model.gpt is gpt
    torch.testing.assert_close(model(idx), expected, rtol=1e-5, atol=1e-5)
    assert model.config["sparsity_coeff"] == 0.8 and model.config["p_norm"] == 1.0 and model.config["kl_coeff"] == 1.0
    assert model.config["in_to_orig_coeff"] == 0.0 and model.config["in_to_orig_positions"] == []
    assert model.config["out_to_in_coeff"] == 0.0 and model.config["out_to_orig_coeff"] == 0.0
    assert model.config["dataset"] == "apollo-research/Skylion007-openwebtext-tokenizer-gpt2"
    assert model.config["init_from"] == "gpt2"
    # the same pair as a checkpoint spec: the .pt, its config found beside it
    assert checkpoint_kind(str(pt)) == ("e2e_sae", str(pt))
    torch.testing.assert_close(SAETransformer.from_checkpoint(str(pt), gpt=gpt)(idx), expected, rtol=1e-5, atol=1e-5)
    assert checkpoint_kind(f"e2e_sae:{HUB_REPO}/{HUB_NAME}") == ("e2e_sae-hub", f"{HUB_REPO}/{HUB_NAME}")
    with pytest.raises(ValueError, match="a e2e_sae: spec is e2e_sae:owner/repo/name"):
        checkpoint_kind(f"e2e_sae:{HUB_REPO}")


def test_from_local_path_refuses_incomplete_calls(tmp_path):
    with pytest.raises(ValueError, match="checkpoint_file and config_file together .*config_file=None"):
        SAETransformer.from_local_path(checkpoint_file="e2e_similar_ce_layer_6.pt")
    with pytest.raises(ValueError, match="checkpoint_file and config_file together .*checkpoint_file=None"):
        SAETransformer.from_local_path(config_file="e2e_similar_ce_layer_6.yaml")
    with pytest.raises(ValueError, match="needs checkpoint_dir .* or checkpoint_file and config_file"):
        SAETransformer.from_local_path()
    with pytest.raises(FileNotFoundError, match="checkpoint_dir .*nowhere is not a directory"):
        SAETransformer.from_local_path(checkpoint_dir=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"missing\.pt not found"):
        SAETransformer.from_local_path(checkpoint_file=tmp_path / "missing.pt", config_file=tmp_path / "x.yaml")


# ---- SAELens ----

def saelens_forward(x, w, cfg):
    """SAELens's inference SAEs (its saes/*.py) computed from the tensors and cfg.json of a directory:

        pre   = (x - b_dec if apply_b_dec_to_input) W_enc + b_enc
        c     = ReLU(pre)                      standard
                ReLU(pre) [pre > threshold]    jumprelu
                ReLU(TopK(pre'))               topk; pre' = pre ||W_dec_j|| with rescale_acts_by_decoder_norm,
                                               which then decodes c_j / ||W_dec_j||
        x_hat = c W_dec + b_dec                no normalisation of W_dec

    Returns (x_hat, c)."""
    x_in = x - w["b_dec"] if cfg.get("apply_b_dec_to_input", True) else x
    pre = x_in @ w["W_enc"] + w["b_enc"]  # (..., d_sae)
    norms = w["W_dec"].norm(dim=1)
    rescale = cfg["architecture"] == "topk" and cfg.get("rescale_acts_by_decoder_norm", False)
    if rescale:
        pre = pre * norms
    if cfg["architecture"] == "standard":
        c = torch.relu(pre)
    elif cfg["architecture"] == "jumprelu":
        c = torch.relu(pre) * (pre > w["threshold"])
    else:
        top = pre.topk(cfg["k"], dim=-1)
        c = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    return (c / norms if rescale else c) @ w["W_dec"] + w["b_dec"], c


def load_saelens_settings(activation):
    """What an export reads back as: BatchTopK was written as the JumpReLU it is at inference."""
    return {"relu": {"activation": "relu"}, "topk": {"activation": "topk", "k": 5}}.get(
        activation, {"activation": "jumprelu", "bandwidth": 0.001})


@pytest.mark.parametrize("activation", list(SETTINGS))
def test_saelens_export_has_saelens_files_and_reads_back(tmp_path, activation):
    sae = trained_like(SAE(32, 64, activation=activation, **SETTINGS[activation]), 3)
    save_saelens(sae, str(tmp_path / "sl"), POS, model_name="gpt2", context_size=64, dataset_path="shakespeare")
    assert sorted(os.listdir(tmp_path / "sl")) == ["cfg.json", "sae_weights.safetensors"]
    w = load_file(str(tmp_path / "sl" / "sae_weights.safetensors"))
    shapes = {"W_enc": (32, 64), "b_enc": (64,), "W_dec": (64, 32), "b_dec": (32,)}
    if activation in ("jumprelu", "batchtopk"):
        shapes["threshold"] = (64,)
        torch.testing.assert_close(w["threshold"], sae.activation.threshold.detach().expand(64))
    assert {k: tuple(v.shape) for k, v in w.items()} == shapes
    assert all(v.dtype == torch.float32 for v in w.values())
    torch.testing.assert_close(w["W_dec"].norm(dim=1), torch.ones(64))  # the normalised dictionary
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    expected = dict(architecture=ARCHITECTURE[activation], d_in=32, d_sae=64, apply_b_dec_to_input=False,
                    hook_name=POS, model_name="gpt2", hook_layer=1, activation_fn="relu", activation_fn_str="relu",
                    normalize_activations="none", dtype="float32", device="cpu", context_size=64,
                    dataset_path="shakespeare", prepend_bos=False, finetuning_scaling_factor=False)
    if activation == "topk":
        expected.update(k=5, rescale_acts_by_decoder_norm=False)
    assert {k: cfg.get(k) for k in expected} == expected
    assert activation == "topk" or "k" not in cfg
    assert cfg["metadata"]["hook_name"] == POS and cfg["metadata"]["model_name"] == "gpt2"

    x = torch.randn(3, 5, 32)
    x_hat, c = sae(x)
    if activation != "relu":  # the threshold (or the selection) zeroes codes ReLU would keep
        assert ((c == 0) & (sae.encoder(x) > 0)).any()
    y, c_theirs = saelens_forward(x, w, cfg)  # what SAELens computes from these files
    torch.testing.assert_close(y, x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c_theirs, c, rtol=1e-5, atol=1e-5)
    back = SAE.from_saelens(str(tmp_path / "sl")).eval()
    assert back.hook_name == POS and back.settings == load_saelens_settings(activation)
    for a, b in zip(back(x), (x_hat, c)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", list(SETTINGS))
def test_saelens_export_encodes_and_decodes_in_saelens_itself(tmp_path, activation):
    """sae_lens is a test dependency (requirements-test.txt), not a dependency of the project."""
    sae_lens = pytest.importorskip("sae_lens")
    sae = trained_like(SAE(32, 64, activation=activation, **SETTINGS[activation]), 6)
    save_saelens(sae, str(tmp_path / "sl"), POS)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sl"))
    assert theirs.cfg.architecture() == ARCHITECTURE[activation]
    x = torch.randn(3, 7, 32)
    x_hat, c = sae(x)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), c, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(c), x_hat, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(x), x_hat, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", list(SETTINGS))
def test_an_input_normalised_sae_exports_folded_and_computes_the_same_in_saelens(tmp_path, activation):
    """An SAE trained on inputs scaled by s (input_scale, as train.py's normalize_activations sets it) is exported
    with s folded in: SAELens's SAE, reading the unscaled activations, reconstructs them exactly as ours does; our
    own checkpoint (SAETransformer.save) is folded too."""
    sae_lens = pytest.importorskip("sae_lens")
    sae = trained_like(SAE(32, 64, activation=activation, **SETTINGS[activation]), 7)
    sae.input_scale.fill_(0.05)  # inputs 20x larger than this SAE's units
    save_saelens(sae, str(tmp_path / "sl"), POS)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sl"))
    x = torch.randn(3, 7, 32) * 20.0
    x_hat, _ = sae(x)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), x_hat, rtol=1e-5, atol=1e-4)
    back = SAE.from_saelens(str(tmp_path / "sl")).eval()
    assert back.input_scale.item() == 1.0
    torch.testing.assert_close(back(x)[0], x_hat, rtol=1e-5, atol=1e-4)
    model = SAETransformer(small_gpt(), [POS], 2.0, saes={POS: sae}).eval()
    model.save(str(tmp_path / "ours.safetensors"))
    ours = SAETransformer.from_checkpoint(str(tmp_path / "ours.safetensors"), small_gpt()).eval()
    torch.testing.assert_close(ours.sae(POS)(x)[0], x_hat, rtol=1e-5, atol=1e-4)


def write_saelens_dir(directory, w, **fields):
    """A directory as SAELens 6 writes one (SAE.save_model): the hook and model under metadata."""
    os.makedirs(directory)
    save_file(w, os.path.join(directory, "sae_weights.safetensors"))
    cfg = dict(d_in=w["W_enc"].shape[0], d_sae=w["W_enc"].shape[1], dtype="float32", device="cpu",
               apply_b_dec_to_input=True, normalize_activations="none", reshape_activations="none",
               metadata={"sae_lens_version": "6.54.12", "sae_lens_training_version": "6.54.12", "hook_name": POS,
                         "model_name": "gpt2"}, **fields)
    with open(os.path.join(directory, "cfg.json"), "w") as f:
        json.dump(cfg, f)
    return cfg


FOREIGN = {"jumprelu": dict(architecture="jumprelu"),
           "topk_rescaled": dict(architecture="topk", k=6, rescale_acts_by_decoder_norm=True),
           "topk_raw": dict(architecture="topk", k=6, rescale_acts_by_decoder_norm=False)}


def write_foreign(directory, kind, seed=11):
    """A SAELens SAE trained elsewhere: decoder rows of norms from 0.1 to 5, b_dec subtracted from the input; a
    JumpReLU's thresholds per element, four of them negative (SAELens's ReLU makes those act as 0)."""
    g = torch.Generator().manual_seed(seed)
    w = {"W_enc": torch.randn(32, 48, generator=g) * 0.3, "b_enc": torch.randn(48, generator=g) * 0.1,
         "W_dec": F.normalize(torch.randn(48, 32, generator=g), dim=1)
         * (0.1 + 4.9 * torch.rand(48, 1, generator=g)),
         "b_dec": torch.randn(32, generator=g) * 0.5}
    if FOREIGN[kind]["architecture"] == "jumprelu":
        w["threshold"] = torch.rand(48, generator=g)
        w["threshold"][:4] = -0.5
    return w, write_saelens_dir(directory, w, **FOREIGN[kind])


def test_foreign_saelens_jumprelu_with_unnormalised_decoder_imports_exactly(tmp_path):
    w, cfg = write_foreign(str(tmp_path / "j"), "jumprelu")
    sae = SAE.from_saelens(str(tmp_path / "j")).eval()
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 3
    y, c = saelens_forward(x, w, cfg)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    assert ((c == 0) & (pre > 0)).any()  # positive thresholds that matter
    assert ((pre[:, :4] > -0.5) & (pre[:, :4] < 0)).any()  # and negative ones, below which SAELens's ReLU still cuts
    ours_y, ours_c = sae(x)
    torch.testing.assert_close(ours_y, y, rtol=1e-4, atol=1e-4)
    # the same elements fire; each code is SAELens's times its element's norm, our dictionary being unit-norm
    torch.testing.assert_close(ours_c, c * w["W_dec"].norm(dim=1), rtol=1e-4, atol=1e-4)


def test_foreign_saelens_topk_rescaled_by_decoder_norm_imports_exactly(tmp_path):
    w, cfg = write_foreign(str(tmp_path / "t"), "topk_rescaled")
    sae = SAE.from_saelens(str(tmp_path / "t")).eval()
    assert sae.settings == {"activation": "topk", "k": 6}
    x = torch.randn(6, 32) * 3
    y, c = saelens_forward(x, w, cfg)
    ours_y, ours_c = sae(x)
    torch.testing.assert_close(ours_y, y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours_c, c, rtol=1e-4, atol=1e-4)


def test_foreign_saelens_topk_selecting_on_unnormalised_rows_is_refused(tmp_path):
    write_foreign(str(tmp_path / "t"), "topk_raw")
    with pytest.raises(ValueError, match="not unit-norm .*rescale_acts_by_decoder_norm false.* no exact equivalent"):
        SAE.from_saelens(str(tmp_path / "t"))


@pytest.mark.parametrize("kind", list(FOREIGN))
def test_the_foreign_files_compute_in_saelens_as_saelens_forward_says(tmp_path, kind):
    """The foreign files above are SAELens's, and saelens_forward is what SAELens computes from them."""
    sae_lens = pytest.importorskip("sae_lens")
    w, cfg = write_foreign(str(tmp_path / kind), kind)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / kind))
    x = torch.randn(6, 32) * 3
    y, c = saelens_forward(x, w, cfg)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), c, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(x), y, rtol=1e-5, atol=1e-5)


def test_foreign_saelens_standard_sae_in_an_old_layout_imports_exactly(tmp_path):
    """An old-style cfg.json (hook_point, activation_fn_str), W_dec rows of any norm, b_dec subtracted from the input,
    and one all-zero dictionary element: the imported SAE reconstructs exactly what SAELens computes."""
    g = torch.Generator().manual_seed(5)
    w = {"W_enc": torch.randn(32, 48, generator=g) * 0.3, "b_enc": torch.randn(48, generator=g) * 0.1,
         "W_dec": torch.randn(48, 32, generator=g) * torch.rand(48, 1, generator=g) * 5,
         "b_dec": torch.randn(32, generator=g)}
    w["W_dec"][7] = 0.0
    os.makedirs(tmp_path / "foreign")
    save_file(w, str(tmp_path / "foreign" / "sae_weights.safetensors"))
    cfg = dict(architecture="standard", d_in=32, d_sae=48, dtype="torch.float32", device="cuda",
               model_name="gpt2-small", hook_point="blocks.2.hook_resid_pre", hook_point_layer=2,
               activation_fn_str="relu", apply_b_dec_to_input=True, normalize_activations=False, context_size=128)
    (tmp_path / "foreign" / "cfg.json").write_text(json.dumps(cfg))
    sae = SAE.from_saelens(str(tmp_path / "foreign"))
    assert sae.hook_name == "blocks.2.hook_resid_pre"
    x = torch.randn(6, 32) * 3
    y, c = saelens_forward(x, w, cfg)
    ours_y, ours_c = sae(x)
    torch.testing.assert_close(ours_y, y, rtol=1e-4, atol=1e-4)
    live = torch.ones(48, dtype=torch.bool)
    live[7] = False  # the zero element never contributes; ours keeps its code at 0
    assert torch.equal(ours_c[:, live] > 0, c[:, live] > 0)
    assert (ours_c[:, 7] == 0).all()


def test_saelens_rejects_what_it_cannot_represent(tmp_path):
    save_saelens(SAE(8, 16), str(tmp_path / "sl"), POS)
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    cfg["architecture"] = "gated"
    (tmp_path / "sl" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="only SAELens's standard .ReLU., topk and jumprelu SAEs"):
        SAE.from_saelens(str(tmp_path / "sl"))
    cfg["architecture"] = "jumprelu"  # but no threshold among its tensors
    (tmp_path / "sl" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="a jumprelu SAE without its threshold"):
        SAE.from_saelens(str(tmp_path / "sl"))
    with pytest.raises(FileNotFoundError, match="no SAELens SAE at .*deeper: it does not exist"):
        SAE.from_saelens(str(tmp_path / "nowhere" / "deeper"))


def test_saelens_methods_on_the_class(tmp_path):
    """SAE.from_saelens and sae.save_saelens: the names interop.py gives e2esae.SAE when it is imported."""
    import e2esae
    sae = trained_like(e2esae.SAE(32, 64, activation="topk", k=5), 9)
    sae.save_saelens(str(tmp_path / "sl"), POS)
    back = e2esae.SAE.from_saelens(str(tmp_path), "sl").eval()
    assert back.settings == sae.settings and back.hook_name == POS
    x = torch.randn(4, 32)
    for a, b in zip(back(x), sae(x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---- this project's checkpoints ----

@pytest.mark.parametrize("activation", list(SETTINGS))
def test_checkpoint_keeps_the_activation(tmp_path, activation):
    gpt = small_gpt()
    model = SAETransformer(gpt, [POS], 2.0, activation=activation, **SETTINGS[activation])
    trained_like(model.sae(POS), 7)
    model.eval()
    model.save(str(tmp_path / "saes.safetensors"), config={"sparsity_coeff": 0.5})
    back = SAETransformer.from_checkpoint(str(tmp_path / "saes.safetensors"), gpt=gpt).eval()
    bandwidth = {"bandwidth": 0.001} if activation == "jumprelu" else {}
    assert back.sae(POS).settings == model.sae(POS).settings == {"activation": activation, **SETTINGS[activation],
                                                                  **bandwidth}
    if activation in ("jumprelu", "batchtopk"):
        assert torch.equal(back.sae(POS).activation.threshold, model.sae(POS).activation.threshold)
    idx = tokens()
    assert torch.equal(back(idx), model(idx))
    assert back.config == {"sparsity_coeff": 0.5}


def test_checkpoint_from_before_the_variants_loads_as_relu(tmp_path):
    """Written as the previous version did: the metadata has sae_positions, dict_size_to_input_ratio and config."""
    sae = randomise(SAE(32, 64), 8)
    w = {"encoder.weight": sae.encoder.weight, "encoder.bias": sae.encoder.bias,
         "decoder.weight": sae.decoder.weight, "decoder.bias": sae.decoder.bias}
    save_file({f"blocks-1-hook_resid_pre.{k}": v.detach().clone() for k, v in w.items()},
              str(tmp_path / "saes.safetensors"),
              metadata={"sae_positions": json.dumps([POS]), "dict_size_to_input_ratio": json.dumps(2.0),
                        "config": json.dumps({"kl_coeff": 1.0})})
    model = SAETransformer.from_checkpoint(str(tmp_path / "saes.safetensors"), gpt=small_gpt())
    assert model.sae(POS).settings == {"activation": "relu"}
    x = torch.randn(4, 32)
    torch.testing.assert_close(model.sae(POS)(x)[0], ref_sae(x, *(t.detach() for t in w.values())),
                               rtol=1e-5, atol=1e-5)
    assert model.config == {"kl_coeff": 1.0}


# ---- checkpoint specs: what a user gets wrong, and what the messages say ----

def test_checkpoint_kind_explains_a_pt_without_what_goes_with_it(tmp_path):
    os.makedirs(tmp_path / "out")
    torch.save({}, tmp_path / "out" / "ckpt.pt")
    with pytest.raises(ValueError) as e:  # train.py's resumable checkpoint alone, from before it held its SAEs
        read_checkpoint(str(tmp_path / "out" / "ckpt.pt"))
    assert "train.py's ckpt.pt without the saes.safetensors" in str(e.value)
    assert "reference" not in str(e.value) and ".yaml" not in str(e.value)
    torch.save({}, tmp_path / "layer_6.pt")
    with pytest.raises(ValueError, match=r"\.pt file without its config: .* need layer_6\.yaml or final_config\.yaml"):
        checkpoint_kind(str(tmp_path / "layer_6.pt"))


def test_load_saelens_typo_under_an_existing_folder_is_a_missing_directory(tmp_path, monkeypatch):
    save_saelens(SAE(8, 16), str(tmp_path / "saes" / "layer_1"), POS)
    monkeypatch.chdir(tmp_path)
    for path, folder in (("saes/layer1", None), ("saes", "layer1")):  # the first could be a repo id, owner/name
        with pytest.raises(FileNotFoundError) as e:
            SAE.from_saelens(path, folder)
        assert "no SAELens SAE at saes/layer1: it does not exist" in str(e.value)
        assert "since saes/ exists here: check its spelling" in str(e.value)


def test_saelens_cfg_without_hook_name_says_to_add_it(tmp_path):
    w, cfg = write_foreign(str(tmp_path / "j"), "jumprelu")
    del cfg["metadata"]["hook_name"]
    (tmp_path / "j" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match='names no position.*Add "hook_name": "blocks.6.hook_resid_pre"'):
        SAE.from_saelens(str(tmp_path / "j"))


def test_a_model_of_another_width_is_refused_naming_both(tmp_path):
    SAETransformer(small_gpt(), [POS], 2.0).save(str(tmp_path / "saes.safetensors"))  # SAEs 32 wide
    save_saelens(randomise(SAE(32, 64), 13), str(tmp_path / "sl"), POS)
    write_reference_run(str(tmp_path / "run"), [POS], E2E_DS_LOSS)
    wide = GPT(GPTConfig(n_layer=3, n_embd=48, n_head=4, vocab_size=50257, block_size=64))
    for spec in ("saes.safetensors", "sl", "run"):
        with pytest.raises(ValueError, match="width 32.* the model is 48 wide: .* the model it was trained on"):
            SAETransformer.from_checkpoint(str(tmp_path / spec), gpt=wide)


# ---- the remote loaders, offline ----

def run_offline(code, tmp_path):
    """In a fresh interpreter: the hub's and wandb's settings are read when they are imported, and an empty home and
    cache make sure nothing is found locally either."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "WANDB_", "HUGGINGFACE"))}
    env.update(HOME=str(tmp_path), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", WANDB_MODE="offline",
               WANDB_CONFIG_DIR=str(tmp_path / "wandb"), PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_saelens_hub_offline_says_what_was_tried(tmp_path):
    r = run_offline("from e2esae import SAE\n"
                    "SAE.from_saelens('neuronpedia/gpt2-small__res_sce-ajt', '6-res_sce-ajt')", tmp_path)
    assert r.returncode != 0
    assert "could not fetch 6-res_sce-ajt/cfg.json and 6-res_sce-ajt/sae_weights.safetensors" in r.stderr
    assert "neuronpedia/gpt2-small__res_sce-ajt" in r.stderr and "SAE.from_saelens('path/to/6-res_sce-ajt')" in r.stderr
    assert ("`hf download neuronpedia/gpt2-small__res_sce-ajt 6-res_sce-ajt/cfg.json "
            "6-res_sce-ajt/sae_weights.safetensors --local-dir .`") in r.stderr


def test_from_wandb_offline_says_what_was_tried(tmp_path):
    """The reference library's SAETransformer.from_wandb, as its README writes it: no other import first."""
    r = run_offline("from e2esae import SAETransformer\n"
                    f"SAETransformer.from_wandb('sparsify/gpt2/tvj2owza', cache_dir={str(tmp_path / 'cache')!r})",
                    tmp_path)
    assert r.returncode != 0
    assert ("could not download final_config.yaml and the newest samples_{N}.pt of the wandb run "
            "sparsify/gpt2/tvj2owza") in r.stderr
    assert "wandb.Api().run('sparsify/gpt2/tvj2owza').files()" in r.stderr
    assert "SAETransformer.from_local_path(" in r.stderr


def test_the_reference_librarys_usage_runs_as_written_in_a_fresh_interpreter(tmp_path):
    """`from e2esae import SAETransformer` then `SAETransformer.from_local_path(...)`, the two lines of the reference
    library's README, with nothing imported first: the loaders are the class's own methods. The model the config
    names (gpt2-small) is passed here, since its weights cannot be downloaded offline."""
    write_reference_run(str(tmp_path / "run"), [POS], E2E_DS_LOSS)
    save_pretrained(small_gpt(), str(tmp_path / "gpt"))
    code = "\n".join([
        "from e2esae import SAETransformer",  # the first line: nothing imported before it
        "import torch",
        "from language_models import load_model",
        f"model = SAETransformer.from_local_path({str(tmp_path / 'run')!r}, gpt=load_model({str(tmp_path / 'gpt')!r}))",
        "idx = torch.zeros(1, 3, dtype=torch.long)",
        "print(tuple(model.sae('blocks.1.hook_resid_pre').dict_elements.shape), tuple(model.forward_raw(idx).shape),",
        "      torch.equal(model(idx), model.forward_raw(idx)))"])
    r = run_offline(code, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["(32,", "64)", "(1,", "3,", "50257)", "False"]  # the SAE spliced in changes the output


def test_e2e_sae_hub_spec_offline_says_what_was_tried(tmp_path):
    code = f"from e2esae import SAETransformer\nSAETransformer.from_checkpoint('e2e_sae:{HUB_REPO}/{HUB_NAME}')"
    r = run_offline(code, tmp_path)
    assert r.returncode != 0
    assert f"could not fetch {HUB_NAME}.pt and {HUB_NAME}.yaml from the Hugging Face repo {HUB_REPO}" in r.stderr
    assert f"`hf download {HUB_REPO} {HUB_NAME}.pt {HUB_NAME}.yaml --local-dir .`" in r.stderr
    assert f"SAETransformer.from_local_path(checkpoint_file='{HUB_NAME}.pt', config_file='{HUB_NAME}.yaml')" in r.stderr
