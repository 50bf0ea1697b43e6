"""Reading and writing other libraries' formats: e2e_sae's checkpoints, SAELens's directories, and the remote
loaders' offline failures. The files are written here exactly as those libraries lay them out."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from e2esae import SAE
from interop import load_e2e_sae, load_saelens, save_saelens
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


def ref_sae(x, W_enc, b_enc, W_dec, b_dec):
    """The SAE as the reference library computes it, from its raw tensors (W_enc (n, d), W_dec (d, n))."""
    c = torch.relu(x @ W_enc.T + b_enc)
    return c @ (W_dec / W_dec.norm(dim=0, keepdim=True)).T + b_dec


def saelens_forward(x, w, apply_b_dec_to_input):
    """SAELens's standard SAE: relu((x - b_dec?) @ W_enc + b_enc) @ W_dec + b_dec, with no normalisation."""
    x_in = x - w["b_dec"] if apply_b_dec_to_input else x
    c = torch.relu(x_in @ w["W_enc"] + w["b_enc"])
    return c @ w["W_dec"] + w["b_dec"], c


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
    model = load_e2e_sae(str(tmp_path / "run"), gpt=gpt)
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
    assert model.config["init_from"] == "gpt2"


def test_reference_checkpoint_from_one_file_and_missing_sections(tmp_path):
    raw = write_reference_run(str(tmp_path / "run"), [POS], {"sparsity": {"coeff": 4.0}, "out_to_in": {"coeff": 1.0}})
    gpt = small_gpt()
    model = load_e2e_sae(str(tmp_path / "run" / "samples_500.pt"), gpt=gpt)  # that file, not newest
    torch.testing.assert_close(model.sae(POS).decoder.weight, raw[500]["blocks-1-hook_resid_pre.decoder.weight"])
    assert model.config["sparsity_coeff"] == 4.0 and model.config["out_to_in_coeff"] == 1.0
    assert model.config["kl_coeff"] == 0.0 and model.config["in_to_orig_coeff"] == 0.0  # absent: 0
    assert model.config["in_to_orig_positions"] == []


def test_reference_checkpoint_errors(tmp_path):
    write_reference_run(str(tmp_path / "run"), ["blocks.2.hook_resid_pre"], E2E_DS_LOSS)
    with pytest.raises(ValueError, match="places them at"):  # the weights sit at blocks.1, the config says blocks.2
        load_e2e_sae(str(tmp_path / "run"), gpt=small_gpt())
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"samples_\{N\}\.pt"):
        load_e2e_sae(str(tmp_path / "empty"), gpt=small_gpt())
    config_path = tmp_path / "run" / "final_config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["tlens_model_name"] = "pythia-14m"
    config_path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="pass the model as gpt="):
        load_e2e_sae(str(tmp_path / "run"))


# ---- SAELens ----

def test_saelens_export_has_the_files_keys_shapes_and_fields_saelens_reads(tmp_path):
    sae = randomise(SAE(32, 64), 3)
    save_saelens(sae, str(tmp_path / "sl"), "blocks.1.hook_resid_pre", model_name="gpt2", context_size=64,
                     dataset_path="shakespeare")
    assert sorted(os.listdir(tmp_path / "sl")) == ["cfg.json", "sae_weights.safetensors"]
    w = load_file(str(tmp_path / "sl" / "sae_weights.safetensors"))
    assert {k: tuple(v.shape) for k, v in w.items()} == {"W_enc": (32, 64), "b_enc": (64,), "W_dec": (64, 32),
                                                          "b_dec": (32,)}
    assert all(v.dtype == torch.float32 for v in w.values())
    torch.testing.assert_close(w["W_dec"].norm(dim=1), torch.ones(64))  # the normalised dictionary
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    expected = dict(architecture="standard", d_in=32, d_sae=64, apply_b_dec_to_input=False, hook_name=POS,
                    model_name="gpt2", hook_layer=1, activation_fn="relu", activation_fn_str="relu",
                    normalize_activations="none", dtype="float32", device="cpu", context_size=64,
                    dataset_path="shakespeare", prepend_bos=False, finetuning_scaling_factor=False)
    assert {k: cfg.get(k) for k in expected} == expected
    assert cfg["metadata"]["hook_name"] == POS and cfg["metadata"]["model_name"] == "gpt2"
    # what SAELens computes from these files is what our SAE computes
    x = torch.randn(3, 5, 32)
    y, c = saelens_forward(x, w, apply_b_dec_to_input=False)
    torch.testing.assert_close(y, sae(x)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c, sae(x)[1], rtol=1e-5, atol=1e-5)


def test_saelens_round_trip(tmp_path):
    sae = randomise(SAE(32, 64), 4)
    save_saelens(sae, str(tmp_path / "sl"), POS)
    back = load_saelens(str(tmp_path / "sl"))
    assert back.hook_name == POS and (back.d_in, back.n_dict) == (32, 64)
    x = torch.randn(4, 32)
    for a, b in zip(back(x), sae(x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # local directory given as repo-style parent + folder
    assert load_saelens(str(tmp_path), "sl").hook_name == POS


def test_foreign_saelens_sae_with_unnormalised_decoder_imports_exactly(tmp_path):
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
    sae = load_saelens(str(tmp_path / "foreign"))
    assert sae.hook_name == "blocks.2.hook_resid_pre"
    x = torch.randn(6, 32) * 3
    y, c = saelens_forward(x, w, apply_b_dec_to_input=True)
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
        load_saelens(str(tmp_path / "sl"))
    cfg["architecture"] = "jumprelu"  # but no threshold among its tensors
    (tmp_path / "sl" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="a jumprelu SAE without its threshold"):
        load_saelens(str(tmp_path / "sl"))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_saelens(str(tmp_path / "nowhere" / "deeper"))


def test_saelens_export_loads_in_saelens_itself(tmp_path):
    """Only where sae_lens is installed (it is not a dependency of this project)."""
    sae_lens = pytest.importorskip("sae_lens")
    sae = randomise(SAE(32, 64), 6)
    save_saelens(sae, str(tmp_path / "sl"), POS)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sl"))
    x = torch.randn(5, 32)
    torch.testing.assert_close(theirs(x), sae(x)[0], rtol=1e-5, atol=1e-5)


# ---- the remote loaders, offline ----

def run_offline(code, tmp_path):
    """In a fresh interpreter: the hub's and wandb's settings are read when they are imported, and an empty home and
    cache make sure nothing is found locally either."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "WANDB_", "HUGGINGFACE"))}
    env.update(HOME=str(tmp_path), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", WANDB_MODE="offline",
               WANDB_CONFIG_DIR=str(tmp_path / "wandb"), PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_load_saelens_hub_offline_says_what_was_tried(tmp_path):
    r = run_offline("from interop import load_saelens\n"
                    "load_saelens('neuronpedia/gpt2-small__res_sce-ajt', '6-res_sce-ajt')", tmp_path)
    assert r.returncode != 0
    assert "could not fetch 6-res_sce-ajt/cfg.json and 6-res_sce-ajt/sae_weights.safetensors" in r.stderr
    assert "neuronpedia/gpt2-small__res_sce-ajt" in r.stderr and "load_saelens('path/to/6-res_sce-ajt')" in r.stderr


def test_load_wandb_offline_says_what_was_tried(tmp_path):
    r = run_offline("from interop import load_wandb\n"
                    f"load_wandb('sparsify/gpt2/tvj2owza', cache_dir={str(tmp_path / 'cache')!r})",
                    tmp_path)
    assert r.returncode != 0
    assert ("could not download final_config.yaml and the newest samples_{N}.pt of the wandb run "
            "sparsify/gpt2/tvj2owza") in r.stderr
    assert "wandb.Api().run('sparsify/gpt2/tvj2owza').files()" in r.stderr
    assert "SAETransformer.from_local_path(" in r.stderr
