"""Shared fixtures: small random GPT-2s saved in Hugging Face's format, and a little real text."""
import os
import sys

import pytest
import torch

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


@pytest.fixture(scope="session")
def hf_gpt2_dir(tmp_path_factory):
    """A 2-layer, 64-wide random GPT-2 in Hugging Face's format (with the HF model itself)."""
    d = tmp_path_factory.mktemp("gpt2_small")
    hf = save_random_hf_gpt2(str(d), **SMALL_CONFIGS[0])
    return str(d), hf
