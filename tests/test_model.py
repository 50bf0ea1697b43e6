"""model.py against Hugging Face's GPT-2 on random weights, the residual seam, generation, tokenizer, errors."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, SMALL_CONFIGS, save_random_hf_gpt2
from language_models import gpt2_tokenizer, save_pretrained
from model import GPT, GPTConfig


@pytest.fixture(scope="module", params=range(len(SMALL_CONFIGS)),
                ids=lambda i: "{n_layer}L-{n_embd}d".format(**SMALL_CONFIGS[i]))
def pair(request, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("hf"))
    hf = save_random_hf_gpt2(d, **SMALL_CONFIGS[request.param], seed=request.param)
    return hf, GPT.from_pretrained(d).eval()


def tokens(B=2, T=17, seed=0):
    return torch.randint(0, 50257, (B, T), generator=torch.Generator().manual_seed(seed))


def test_logits_match_huggingface(pair):
    hf, gpt = pair
    idx = tokens()
    with torch.no_grad():
        ours, theirs = gpt(idx), hf(idx).logits
    assert ours.shape == (2, 17, 50257)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_residual_positions_match_hidden_states(pair):
    hf, gpt = pair
    idx = tokens(seed=1)
    seen = {}

    def record(name):
        def read(x):
            seen[name] = x
            return x
        return read

    with torch.no_grad():
        hidden = hf(idx, output_hidden_states=True).hidden_states  # [embeddings, block 0 out, ..., ln_f(last)]
        gpt(idx, edits={name: record(name) for name in gpt.positions()})
    L = gpt.config.n_layer
    for i in range(L):
        torch.testing.assert_close(seen[f"blocks.{i}.hook_resid_pre"], hidden[i], atol=1e-5, rtol=0)
        if i < L - 1:  # HF's last hidden state has ln_f applied
            torch.testing.assert_close(seen[f"blocks.{i}.hook_resid_post"], hidden[i + 1], atol=1e-5, rtol=0)
    final = gpt.transformer.ln_f(seen[f"blocks.{L - 1}.hook_resid_post"])
    torch.testing.assert_close(final, hidden[L], atol=1e-5, rtol=0)


def test_running_blocks_in_two_ranges_equals_one_run(pair):
    _, gpt = pair
    idx = tokens(seed=2)
    with torch.no_grad():
        full = gpt(idx)
        for k in range(gpt.config.n_layer + 1):
            x = gpt.run_blocks(gpt.embed(idx), 0, k)
            torch.testing.assert_close(gpt.unembed(gpt.run_blocks(x, k)), full, atol=0, rtol=0)


def test_edit_replaces_the_stream():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, vocab_size=101, block_size=16)).eval()
    idx = torch.randint(0, 101, (1, 5))
    with torch.no_grad():
        zeroed = gpt(idx, edits={"blocks.1.hook_resid_pre": torch.zeros_like})
        expected = gpt.unembed(gpt.run_blocks(torch.zeros(1, 5, 32), 1))
        assert torch.equal(zeroed, expected)
        # resid_post of block 0 is the same place as resid_pre of block 1
        assert torch.equal(gpt(idx, edits={"blocks.0.hook_resid_post": torch.zeros_like}), zeroed)


def test_greedy_generation_matches_huggingface(pair):
    hf, gpt = pair
    idx = tokens(B=1, T=5, seed=3)
    ours = gpt.generate(idx, max_new_tokens=8, temperature=0)
    theirs = hf.generate(idx, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(idx), pad_token_id=0)
    assert ours.tolist() == theirs.tolist()


def test_sampling_respects_top_k():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, vocab_size=50, block_size=8)).eval()
    idx = torch.zeros(3, 1, dtype=torch.long)
    out = gpt.generate(idx, max_new_tokens=12, temperature=1.0, top_k=1)  # top_k=1 is greedy
    assert out.shape == (3, 13)
    assert torch.equal(out, gpt.generate(idx, max_new_tokens=12, temperature=0))


def test_save_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, vocab_size=77, block_size=16)).eval()
    save_pretrained(gpt, str(tmp_path))
    again = GPT.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, 77, (2, 9))
    with torch.no_grad():
        assert torch.equal(gpt(idx), again(idx))


def test_save_pretrained_is_readable_by_huggingface(tmp_path):
    from transformers import GPT2LMHeadModel
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, vocab_size=77, block_size=16)).eval()
    save_pretrained(gpt, str(tmp_path))
    hf = GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, 77, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(gpt(idx), hf(idx).logits, atol=1e-5, rtol=0)


def test_tokenizer_offline():
    enc = gpt2_tokenizer()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.eot_token == 50256 and enc.n_vocab == 50257
    text = "Ünïcödé — naïve café, 東京, emoji 🙂 and <tags>"
    assert enc.decode(enc.encode(text)) == text


def test_tokenizer_needs_no_network():
    # a fresh interpreter with the network "off" for the hub and tiktoken alike
    code = ("import socket\n"
            "def refuse(*a, **k): raise OSError('network disabled in this test')\n"
            "socket.socket.connect = refuse\n"
            "import language_models; print(language_models.gpt2_tokenizer().encode('Hello world'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "TIKTOKEN_CACHE_DIR": "/nonexistent"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[15496, 995]"


def test_import_pulls_in_only_torch():
    code = ("import sys, torch; before = set(sys.modules); import model; "
            "print(sorted({m.split('.')[0] for m in set(sys.modules) - before} - set(sys.stdlib_module_names)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['model']"  # nothing beyond torch and the standard library


# ---- errors ----

def test_bad_token_ids_raise():
    gpt = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, vocab_size=50, block_size=8))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 50\)"):
        gpt(torch.tensor([[1, 50]]))
    with pytest.raises(ValueError, match=r"token ids must lie"):
        gpt(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match="longer than the model's block_size 8"):
        gpt(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(batch, seq_len\)"):
        gpt(torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        gpt(torch.zeros(1, 4))


def test_unknown_position_lists_valid_ones():
    gpt = GPT(GPTConfig(n_layer=3, n_embd=32, n_head=2, vocab_size=50, block_size=8))
    for bad in ("blocks.3.hook_resid_pre", "blocks.1.hook_mlp_out", "resid", 6):
        with pytest.raises(ValueError, match=r"blocks\.\{0\.\.2\}\.hook_resid_pre"):
            gpt.resid_index(bad)
    assert gpt.resid_index("blocks.2.hook_resid_post") == 3
    assert gpt.resid_index("blocks.1.hook_resid_post") == gpt.resid_index("blocks.2.hook_resid_pre")


def test_missing_file_unknown_name_and_wrong_shape(tmp_path, hf_gpt2_dir):
    with pytest.raises(ValueError, match="neither a directory nor one of"):
        GPT.from_pretrained("gpt3-ultra")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        GPT.from_pretrained(str(tmp_path))
    # a weight file whose tensor has the wrong shape names the file, the tensor and both shapes
    from safetensors.torch import load_file, save_file
    src, _ = hf_gpt2_dir
    sd = load_file(os.path.join(src, "model.safetensors"))
    key = next(k for k in sd if k.endswith("h.0.mlp.c_fc.weight"))
    sd[key] = torch.zeros(64, 200)
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    message = (r"model\.safetensors: tensor 'transformer\.h\.0\.mlp\.c_fc\.weight' has shape \(200, 64\), "
               r"expected \(256, 64\)")
    with pytest.raises(ValueError, match=message):
        GPT.from_pretrained(str(tmp_path))
