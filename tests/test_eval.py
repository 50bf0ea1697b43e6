"""eval.py and sample.py as a user runs them (subprocesses, offline, on a small random GPT-2 and local text), and
the plots."""
import json
import os
import random
import subprocess
import sys
from itertools import islice

import pytest
import torch
import torch.nn.functional as F
import yaml

import data
from e2esae import SAE, SAETransformer
from interop import save_saelens
from language_models import save_pretrained
from model import GPT, GPTConfig
from report import plot_frequency_histogram, plot_pareto, training_type

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_CTX, N_SAMPLES = 32, 6
WORDS = ("the king and queen of a land far away spoke to their people about bread war peace and the sea while "
         "children played in fields of gold under a grey sky that never seemed to end").split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small random GPT-2 on disk, 40 little text documents (two held out), and a checkpoint in each format."""
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=3, n_embd=32, n_head=4, vocab_size=50257, block_size=64)).eval()
    save_pretrained(gpt, str(root / "gpt"))
    rng = random.Random(0)
    os.makedirs(root / "text")
    for i in range(40):
        (root / "text" / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(200)))

    ours = SAETransformer(gpt, ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"], dict_size_to_input_ratio=2.0)
    ours.save(str(root / "saes.safetensors"), config={"init_from": str(root / "gpt"), "sparsity_coeff": 2.0,
                                                      "p_norm": 1.0, "kl_coeff": 1.0, "in_to_orig_coeff": 0.0})
    ref = root / "ref"
    os.makedirs(ref)
    sae = SAE(32, 64)
    state = {f"blocks-1-hook_resid_pre.{k.replace('encoder.', 'encoder.0.')}": v for k, v in sae.state_dict().items()}
    torch.save(state, str(ref / "samples_100.pt"))
    (ref / "final_config.yaml").write_text(yaml.safe_dump({
        "tlens_model_name": "gpt2-small",
        "saes": {"sae_positions": ["blocks.1.hook_resid_pre"], "dict_size_to_input_ratio": 2.0},
        "loss": {"sparsity": {"coeff": 10.0, "p_norm": 1.0}, "logits_kl": {"coeff": 0.5}, "out_to_in": None,
                 "in_to_orig": {"hook_positions": ["blocks.2.hook_resid_pre"], "total_coeff": 2.5}}}))
    save_saelens(SAE(32, 48), str(root / "saelens"), "blocks.2.hook_resid_pre")
    return root, gpt


def run_script(script, args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"})


def test_eval_prints_one_table_and_writes_every_metric(setup):
    root, gpt = setup
    specs = [str(root / "saes.safetensors"), str(root / "ref"), str(root / "saelens")]
    r = run_script("eval.py", [f"--checkpoints={specs!r}", f"--init_from={root / 'gpt'}", f"--dataset={root / 'text'}",
                               f"--n_ctx={N_CTX}", f"--eval_n_samples={N_SAMPLES}", "--batch_size=4", "--device=cpu",
                               f"--out_json={root / 'eval.json'}", f"--plot_dir={root / 'plots'}"], cwd=str(root))
    assert r.returncode == 0, r.stderr
    lines = r.stdout[r.stdout.index("\ncheckpoint "):].splitlines()
    table = [[cell.strip() for cell in line.split("|")] for line in lines if " | " in line]
    assert table[0][:7] == ["checkpoint", "position", "type", "activation", "lambda", "L0", "alive"]
    assert [row[:5] for row in table[1:]] == [  # 2 + 1 + 1 SAEs, one table
        [specs[0], "blocks.0.hook_resid_pre", "e2e", "relu", "2"],
        [specs[0], "blocks.1.hook_resid_pre", "e2e", "relu", "2"],
        [specs[1], "blocks.1.hook_resid_pre", "e2e+ds", "relu", "10"],
        [specs[2], "blocks.2.hook_resid_pre", "unknown", "relu", "-"]]

    out = json.loads((root / "eval.json").read_text())
    rows = out["rows"]
    assert [(row["checkpoint"], row["position"]) for row in rows] == [
        (specs[0], "blocks.0.hook_resid_pre"), (specs[0], "blocks.1.hook_resid_pre"),
        (specs[1], "blocks.1.hook_resid_pre"), (specs[2], "blocks.2.hook_resid_pre")]
    assert [row["type"] for row in rows] == ["e2e", "e2e", "e2e+ds", "unknown"]
    assert [row["sparsity_coeff"] for row in rows] == [2.0, 2.0, 10.0, None]
    for row in rows:
        assert row["n_tokens"] == N_SAMPLES * N_CTX
        assert 0 <= row["alive"] <= row["n_dict"] and 0 <= row["l0"] <= row["n_dict"]
        assert row["ce_increase"] == pytest.approx(row["ce_sae"] - row["ce_orig"], abs=1e-6)
        assert row["kl"] >= 0 and row["explained_variance"] <= 1  # random SAEs: far below 0
    # explained variance at every hook_resid_pre after the last SAE, and none after the last block
    assert list(rows[0]["downstream_explained_variance"]) == ["blocks.2.hook_resid_pre"]
    assert rows[3]["downstream_explained_variance"] == {}
    metrics = out["checkpoints"][0]["metrics"]
    for key in ("kl", "ce_orig", "ce_sae", "ce_increase", "top1_acc_orig", "top1_acc_sae", "top1_consistency",
                "stat_distance", "sparsity/blocks.1.hook_resid_pre", "l0/blocks.0.hook_resid_pre",
                "frac_zeros/blocks.0.hook_resid_pre", "out_to_in/blocks.0.hook_resid_pre",
                "explained_variance_ln_std/blocks.1.hook_resid_pre", "in_to_orig/blocks.2.hook_resid_pre",
                "in_to_orig_explained_variance/blocks.2.hook_resid_pre"):
        assert key in metrics, key
    assert out["checkpoints"][0]["alive"]["blocks.0.hook_resid_pre"] == rows[0]["alive"]
    assert out["settings"]["eval_n_samples"] == N_SAMPLES

    # the model's CE, computed here on the same held-out samples
    idx = torch.stack(list(islice(data.token_samples(str(root / "text"), N_CTX, "eval", repeat=False), N_SAMPLES)))
    with torch.no_grad():
        logits = gpt(idx)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten()).item()
    assert rows[0]["ce_orig"] == pytest.approx(ce, abs=1e-4)

    plots = sorted(os.listdir(root / "plots"))
    assert "pareto.png" in plots and len([p for p in plots if p.startswith("freq_")]) == 4
    assert all(os.path.getsize(root / "plots" / p) > 5000 for p in plots)


@pytest.mark.parametrize("name, message", [("nothing_here", "does not exist"), ("notes.txt", "is none of")])
def test_eval_refuses_an_unknown_checkpoint_before_any_work(setup, name, message):
    root, _ = setup
    (root / "notes.txt").write_text("not a checkpoint")
    r = run_script("eval.py", [f"--checkpoints=['{root / 'saes.safetensors'}', '{root / name}']",
                               f"--dataset={root / 'text'}", f"--n_ctx={N_CTX}", "--eval_n_samples=1", "--device=cpu",
                               f"--out_json={root / 'refused' / 'eval.json'}"], cwd=str(root))
    assert r.returncode != 0 and message in r.stderr and "data:" not in r.stdout
    assert not (root / "refused").exists()


def test_training_type_from_coefficients():
    assert training_type(0.0, 0.0) == "local"
    assert training_type(0.5, 0.0) == "e2e"
    assert training_type(0.5, 2.5) == "e2e+ds"


def test_plots_are_written(tmp_path):
    rows = [dict(type=t, sparsity_coeff=s, l0=l0, ce_increase=ce, alive=alive)
            for t, pts in {"local": [(0.8, 73.5, 0.016, 41000), (4, 40.0, 0.144, 26000)],
                           "e2e": [(0.5, 33.4, 0.020, 22000), (3, 27.5, 0.145, 22000)],
                           "e2e+ds": [(10, 36.2, 0.015, 18000), (50, 36.8, 0.124, 15000)]}.items()
            for s, l0, ce, alive in pts]
    plot_pareto(rows, str(tmp_path / "pareto.png"), title="test")
    freqs = torch.cat([torch.zeros(300), 10 ** (-5 * torch.rand(2000))])  # 300 dead, the rest from 1e-5 to 1
    plot_frequency_histogram(freqs.numpy(), str(tmp_path / "freq.png"))
    for name in ("pareto.png", "freq.png"):
        data_bytes = (tmp_path / name).read_bytes()
        assert data_bytes[:8] == b"\x89PNG\r\n\x1a\n" and len(data_bytes) > 5000


def test_sample_prints_both_continuations(setup):
    root, _ = setup
    r = run_script("sample.py", [f"--checkpoint={root / 'saes.safetensors'}", "--prompt=the king and the queen",
                                 "--max_new_tokens=8", "--temperature=0", "--device=cpu"], cwd=str(root))
    assert r.returncode == 0, r.stderr
    (title, plain), (spliced_title, spliced) = [b.split(" ---\n", 1) for b in r.stdout.split("\n--- ")[1:]]
    assert spliced_title == f"{title} with SAEs at blocks.0.hook_resid_pre, blocks.1.hook_resid_pre"  # the model's name
    plain = plain.split("\n--- ")[0]
    assert plain.startswith("the king and the queen") and spliced.startswith("the king and the queen")
    assert len(plain) > len("the king and the queen") and len(spliced.strip()) > len("the king and the queen")
