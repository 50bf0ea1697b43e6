"""Shared fixtures: small random GPT-2s saved in Hugging Face's format or ours, and a little real text."""
import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network here: a hub id fails at once, as it would offline
if not torch.cuda.is_available():
    # Triton's interpreter runs the kernels on the CPU; it must be chosen before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SMALL_CONFIGS = [dict(n_layer=2, n_embd=64, n_head=4), dict(n_layer=3, n_embd=96, n_head=6)]


def save_random_hf_gpt2(directory, n_layer, n_embd, n_head, vocab_size=50257, n_positions=128, seed=0):
    """A randomly initialised Hugging Face GPT2LMHeadModel written with save_pretrained (safetensors)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size, n_positions=n_positions)
    hf = GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(directory)
    return hf


@pytest.fixture(scope="session", autouse=True)
def own_cache(tmp_path_factory):
    """The token files and small models the tests make go to a temporary folder, not the user's cache (subprocesses
    inherit it; a test that needs its own sets E2ESAE_CACHE again)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("E2ESAE_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def hf_gpt2_dir(tmp_path_factory):
    """A 2-layer, 64-wide random GPT-2 in Hugging Face's format (with the HF model itself)."""
    d = tmp_path_factory.mktemp("gpt2_small")
    hf = save_random_hf_gpt2(str(d), **SMALL_CONFIGS[0])
    return str(d), hf


def tiny_gpt(tmp_path_factory, n_layer=2, n_embd=32):
    """A random GPT-2 of this shape (4 heads, 64 positions) saved in this project's format; its directory."""
    from model import GPT, GPTConfig, save_pretrained
    d = str(tmp_path_factory.mktemp(f"gpt_{n_layer}x{n_embd}"))
    torch.manual_seed(0)
    save_pretrained(GPT(GPTConfig(n_layer=n_layer, n_embd=n_embd, n_head=4, block_size=64)), d)
    return d


@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory):
    """A 2-layer, 32-wide random GPT-2 in this project's format: the model the whole-run tests train SAEs on."""
    return tiny_gpt(tmp_path_factory)


@pytest.fixture(scope="module")
def gpt3_dir(tmp_path_factory):
    """The same, 3 layers deep: room for an SAE with a downstream position after it (e2e+ds)."""
    return tiny_gpt(tmp_path_factory, n_layer=3)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """40 documents of real English: the first 3,000 characters of Shakespeare's plays, and more."""
    import data
    d = tmp_path_factory.mktemp("text")
    plays = data.shakespeare_files()
    for i in range(40):
        text = open(plays[i % len(plays)], encoding="utf-8").read()
        start = 3000 * (i // len(plays))
        (d / f"doc{i:02d}.txt").write_text(text[start:start + 3000], encoding="utf-8")
    return str(d)


def play_text(i, chars):
    import data
    plays = data.shakespeare_files()
    return open(plays[i], encoding="utf-8").read()[:chars]


@pytest.fixture(scope="module")
def one_file(tmp_path_factory):
    """One text file, the way people bring their own data (nanoGPT's input.txt): ~5,000 tokens."""
    path = tmp_path_factory.mktemp("one") / "my_corpus.txt"
    path.write_text(play_text(0, 20_000), encoding="utf-8")
    return str(path)


def args(gpt_dir, dataset, out_dir, **overrides):
    """train.py's command line for a run of 12 steps on gpt_dir's model (a checkpoint and an evaluation every 6)."""
    settings = dict(init_from=gpt_dir, dataset=dataset, sae_positions=["blocks.1.hook_resid_pre"],
                    dict_size_to_input_ratio=4.0, n_ctx=32, n_samples=48, batch_size=4, lr=1e-2, warmup_samples=8,
                    eval_every_n_samples=24, eval_n_samples=8, save_every_n_samples=24, log_every_n_steps=4,
                    out_dir=str(out_dir), device="cpu")
    settings.update(overrides)
    return [f"--{k}={v!r}" if not isinstance(v, str) else f"--{k}={v}" for k, v in settings.items()]
