"""train.py, eval.py and the SAELens export on tiny random models of every named family, offline: each model is built
with transformers' own config class and saved in the hub's layout with a tokenizer trained here, then trained on as a
user would, `python train.py --init_from=DIR`: local, e2e and e2e+ds SAEs (the loss falls, the checkpoints are
written, a resume ends where an uninterrupted run does), eval.py reads the checkpoint, SAELens loads the export.
(tests/test_hf_model.py checks the models themselves against transformers' forward.)"""
import json
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

import analysis
import eval as eval_script
import report
import sample
import train
from conftest import args, save_bpe_tokenizer
from e2esae import SAETransformer

# family -> (its config's settings, the tokenizer: "bos" Llama-like, encoding puts BOS in front; "plain" Pythia-like;
# "wide" Pythia-like with ids past 65,535; "gpt2" GPT-2's own, the model read by model.py)
SHAPE = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
             max_position_embeddings=64, bos_token_id=1, eos_token_id=0, pad_token_id=0)
FAMILIES = {
    "gpt_neox": (dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                      max_position_embeddings=64, rotary_pct=0.25, bos_token_id=0, eos_token_id=0), "plain"),
    "llama": (SHAPE, "bos"),
    "llama-wide": (SHAPE, "wide"),
    "qwen3": (dict(SHAPE, head_dim=8, bos_token_id=0), "plain"),
    "gemma2": (dict(SHAPE, head_dim=8, sliding_window=8, attn_implementation="eager"), "bos"),
    "gemma3_text": (dict(SHAPE, head_dim=8, sliding_window=8,
                         layer_types=["sliding_attention", "full_attention", "sliding_attention"]), "bos"),
    "mistral": (dict(SHAPE, sliding_window=8), "bos"),
    "gpt2": (dict(n_layer=3, n_embd=32, n_head=4, n_positions=64, vocab_size=50257), "gpt2"),
}
VOCAB = {"bos": 1000, "plain": 1000, "wide": 66536}
TYPES = {"local": dict(kl_coeff=0.0, out_to_in_coeff=1.0), "e2e": dict(kl_coeff=1.0),
         "e2e+ds": dict(kl_coeff=0.5, in_to_orig_coeff=1.0, in_to_orig_positions=["blocks.2.hook_resid_pre"])}


@pytest.fixture(scope="module", params=list(FAMILIES))
def model_dir(request, tmp_path_factory):
    """A tiny random model of the family in the hub's layout: config.json, weights and (but for GPT-2) tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM
    name = request.param
    settings, tokenizer = FAMILIES[name]
    directory = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)
    config = AutoConfig.for_model(name.split("-")[0], **settings, **({} if tokenizer == "gpt2" else
                                                                    {"vocab_size": VOCAB[tokenizer]}))
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    if tokenizer != "gpt2":
        save_bpe_tokenizer(directory, bos=tokenizer == "bos", wide_ids=tokenizer == "wide")
    return str(directory), tokenizer


def family_args(directory, text_dir, out, **overrides):
    """8 steps of 4 samples x 16 tokens on the SAE at blocks.1, an evaluation at the end."""
    settings = dict(n_ctx=16, n_samples=32, batch_size=4, eval_every_n_samples=32, save_every_n_samples=16,
                    eval_n_samples=8, log_every_n_steps=1, dict_size_to_input_ratio=2.0, lr=3e-2)
    return args(directory, text_dir, out, **{**settings, **overrides})


def logged_losses(out):
    return [float(line.split("| loss ")[1].split()[0]) for line in out.splitlines() if line.startswith("step ")]


def test_every_training_type_trains_on_the_family(model_dir, text_dir, tmp_path, capsys):
    directory, tokenizer = model_dir
    for kind, loss in TYPES.items():
        train.main(family_args(directory, text_dir, tmp_path / kind, **loss))
        out = capsys.readouterr().out
        losses = logged_losses(out)
        assert len(losses) == 8 and losses[-1] < losses[0], (kind, losses)
        assert {"ckpt.pt", "saes.safetensors"} <= set(os.listdir(tmp_path / kind))
        model = SAETransformer.from_checkpoint(str(tmp_path / kind))  # the model the checkpoint names, reloaded
        assert model.bos_token_id == (1 if tokenizer == "bos" else None)  # BOS left to the model where it is added
        assert type(model.gpt).__name__ == ("GPT" if tokenizer == "gpt2" else "HFModel")


def test_resume_eval_and_the_saelens_export(model_dir, text_dir, tmp_path, capsys, monkeypatch):
    """An e2e+ds run stopped by Ctrl-C after step 3 and resumed ends with the same SAEs as one uninterrupted run;
    eval.py reads it on the model's own tokens; SAELens's loader reads its export, which names the model and hook."""
    directory, tokenizer = model_dir
    train.main(family_args(directory, text_dir, tmp_path / "whole", **TYPES["e2e+ds"]))
    log_line = report.log_line

    def stop_after_step_3(step, *rest):  # Ctrl-C as the third step's line is logged: the run saves and stops
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return log_line(step, *rest)
    monkeypatch.setattr(report, "log_line", stop_after_step_3)
    with pytest.raises(SystemExit) as stopped:
        train.main(family_args(directory, text_dir, tmp_path / "cut", **TYPES["e2e+ds"]))
    assert stopped.value.code == 130
    monkeypatch.setattr(report, "log_line", log_line)
    train.main(family_args(directory, text_dir, tmp_path / "cut", **TYPES["e2e+ds"], resume=True))
    assert "resumed from" in capsys.readouterr().out
    whole, cut = load_file(tmp_path / "whole" / "saes.safetensors"), load_file(tmp_path / "cut" / "saes.safetensors")
    for k in whole:
        torch.testing.assert_close(cut[k], whole[k], rtol=0, atol=1e-6)

    eval_script.main([f"--checkpoints=['{tmp_path / 'whole'}']", f"--out_json={tmp_path / 'eval.json'}",
                      "--n_ctx=16", "--eval_n_samples=8", "--batch_size=4", "--device=cpu"])
    row = json.loads((tmp_path / "eval.json").read_text())["rows"][0]
    assert row["ce_orig"] > 0 and row["l0"] > 0 and row["position"] == "blocks.1.hook_resid_pre"

    sample.main([f"--checkpoint={tmp_path / 'whole'}", "--prompt=To be", "--max_new_tokens=3", "--device=cpu"])
    printed = capsys.readouterr().out
    assert printed.count("\n--- ") == 2  # the model's text, then the same with the SAEs spliced in

    sae_lens = pytest.importorskip("sae_lens")
    model = SAETransformer.from_checkpoint(str(tmp_path / "whole")).eval()
    model.save_saelens(str(tmp_path / "export"))
    folder = tmp_path / "export" / "blocks.1.hook_resid_pre"
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_pre" and cfg["metadata"]["model_name"] == directory
    assert cfg["metadata"]["prepend_bos"] == (tokenizer == "bos")
    theirs = sae_lens.SAE.load_from_disk(str(folder))
    x = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model.sae("blocks.1.hook_resid_pre")(x)[0], rtol=1e-5, atol=1e-5)
    shutil.rmtree(tmp_path / "export")


def test_analysis_reads_a_family_checkpoint(model_dir, text_dir, tmp_path):
    """analysis.py's geometry and feature browser on the model's own tokens (one family: the Llama-like one)."""
    directory, tokenizer = model_dir
    if tokenizer != "bos":
        pytest.skip("analysed on the Llama-like families; the others share the same code path")
    train.main(family_args(directory, text_dir, tmp_path / "run", **TYPES["e2e"]))
    analysis.main([f"--checkpoints=['{tmp_path / 'run'}']", f"--dataset={text_dir}", "--n_ctx=16",
                   "--eval_n_samples=8", "--batch_size=4", "--device=cpu", f"--out_dir={tmp_path / 'analysis'}"])
    page = (tmp_path / "analysis" / "features.html").read_text()
    assert "e2e" in page and "blocks.1.hook_resid_pre" in page
