"""hf_model.py against transformers itself: a tiny random model of every supported family, saved with save_pretrained
and loaded back through HFModel, must give the library's logits and hidden states, splice exactly, and edit."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from hf_model import HFModel

VOCAB, T, WINDOW = 300, 24, 8  # T > 2 windows: a sliding layer's last position cannot see position 0
SHAPE = dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
             vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
SLIDING_GLOBAL = ["sliding_attention", "full_attention", "sliding_attention"]
FAMILIES = {  # model_type -> its config's settings: 3 layers, 64 wide, and what makes the family itself
    "gpt_neox": dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, intermediate_size=96,
                     vocab_size=VOCAB, max_position_embeddings=64, use_parallel_residual=True, rotary_pct=0.25),
    "llama": SHAPE,
    "mistral": dict(SHAPE, sliding_window=WINDOW),
    "qwen2": SHAPE,
    "qwen3": dict(SHAPE, head_dim=16),
    # caps low and weights large enough that both soft caps bind (checked below); layers alternate sliding/global
    "gemma2": dict(SHAPE, head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=1.0, final_logit_softcapping=3.0,
                   initializer_range=0.3, attn_implementation="eager"),
    # local layers rotate with base 10,000, the global one with 1,000,000 (the config's defaults)
    "gemma3_text": dict(SHAPE, head_dim=16, sliding_window=WINDOW, layer_types=SLIDING_GLOBAL),
    "olmo2": SHAPE,
    "phi3": SHAPE,
    "granite": dict(SHAPE, embedding_multiplier=3.0, residual_multiplier=0.5, logits_scaling=2.0),
    "gpt2": dict(n_layer=3, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=1, eos_token_id=2),
}
SLIDING = {"mistral": [True] * 3, "gemma2": [True, False, True], "gemma3_text": [True, False, True]}  # per layer


def random_model(model_type, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**FAMILIES[model_type], **overrides})
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    """model_type -> (transformers' model, HFModel loaded from its save_pretrained directory, the directory), each
    built once."""
    built = {}

    def get(model_type):
        if model_type not in built:
            hf = random_model(model_type)
            directory = str(tmp_path_factory.mktemp(model_type))
            hf.save_pretrained(directory)
            built[model_type] = hf, HFModel.from_pretrained(directory), directory
        return built[model_type]
    return get


@pytest.fixture(params=list(FAMILIES))
def family(request, saved):
    return (request.param, *saved(request.param))


def tokens(B=2, seed=0):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def test_config_and_frozen(family):
    model_type, hf, ours, directory = family
    c = ours.config
    assert (c.n_layer, c.n_embd, c.vocab_size, c.block_size, c.model_type) == (3, 64, VOCAB, 64, model_type)
    assert c.bos_token_id == hf.config.bos_token_id
    assert ours.name_or_path == os.path.abspath(directory)
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())


def test_logits_match_transformers(family):
    _, hf, ours, _ = family
    idx = tokens()
    with torch.no_grad():
        logits = ours(idx)
        expected = hf(idx).logits
    assert logits.shape == (2, T, VOCAB)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_residual_stream_matches_hidden_states(family):
    """blocks.L.hook_resid_pre is the library's hidden_states[L]; the last layer's hook_resid_post is that layer's
    output (read with a forward hook), before the final norm; final_norm of it is the library's last hidden state."""
    model_type, hf, ours, _ = family
    idx = tokens(seed=1)
    caught = []
    last = hf.base_model.layers[-1] if model_type != "gpt2" else hf.transformer.h[-1]
    hook = last.register_forward_hook(lambda m, args, out: caught.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            hidden = hf(idx, output_hidden_states=True).hidden_states  # [layer 0 in, ..., layer n-1 in, normed out]
    finally:
        hook.remove()
    seen = {}

    def record(name):
        return lambda x: seen.setdefault(name, x)

    with torch.no_grad():
        ours(idx, edits={name: record(name) for name in ours.positions()})
    n = ours.config.n_layer
    for L in range(n):
        torch.testing.assert_close(seen[f"blocks.{L}.hook_resid_pre"], hidden[L], atol=1e-5, rtol=0)
    torch.testing.assert_close(seen[f"blocks.{n - 1}.hook_resid_post"], caught[0], atol=1e-5, rtol=0)
    scale = hf.config.logits_scaling if model_type == "granite" else 1.0  # folded into Granite's final_norm
    torch.testing.assert_close(ours.final_norm(caught[0]) * scale, hidden[n], atol=1e-5, rtol=0)


def test_the_head_the_losses_read_gives_the_logits(family):
    """softcap(final_norm(x) @ head_weight.T + head_bias) is the model's logits, from the last layer's output."""
    _, hf, ours, _ = family
    idx = tokens(seed=2)
    with torch.no_grad():
        logits = F.linear(ours.final_norm(ours.run_blocks(ours.embed(idx), 0)), ours.head_weight, ours.head_bias)
        if ours.logit_softcap is not None:
            logits = ours.logit_softcap * torch.tanh(logits / ours.logit_softcap)
        torch.testing.assert_close(logits, hf(idx).logits, atol=1e-5, rtol=0)


def test_identity_splice_and_split_ranges_are_exact(family):
    _, _, ours, _ = family
    idx = tokens(seed=3)
    n = ours.config.n_layer
    with torch.no_grad():
        clean = ours(idx)
        for position in ("blocks.1.hook_resid_pre", f"blocks.{n - 1}.hook_resid_pre"):
            torch.testing.assert_close(ours(idx, edits={position: lambda x: x}), clean, atol=1e-5, rtol=0)
        x = ours.embed(idx)
        for start, stop in ((0, 1), (1, 2), (2, n)):
            x = ours.run_blocks(x, start, stop)
        torch.testing.assert_close(ours.unembed(x), clean, atol=1e-5, rtol=0)


def test_gradients_reach_the_stream_and_not_the_weights(family):
    """What SAE training needs of the frozen model: a loss on the logits has a gradient with respect to the stream."""
    _, _, ours, _ = family
    x = ours.embed(tokens(seed=9)).detach().requires_grad_()
    ours.unembed(ours.run_blocks(x, 1)).logsumexp(-1).sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is None for p in ours.parameters())


def test_an_edit_changes_the_stream_from_its_layer_on(family):
    _, _, ours, _ = family
    idx = tokens(seed=4)
    seen = {}

    def record(name):
        return lambda x: seen.setdefault(name, x)

    def edit(x):
        return x + torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(x.dtype)

    with torch.no_grad():
        clean = {}
        ours(idx, edits={name: (lambda x, name=name: clean.setdefault(name, x)) for name in ours.positions()})
        # names at one place apply in order: record index 2, replace it, then record what follows
        edited = ours(idx, edits={"blocks.1.hook_resid_pre": record("1"), "blocks.2.hook_resid_pre": record("2"),
                                  "blocks.1.hook_resid_post": edit, "blocks.2.hook_resid_post": record("3")})
        logits = ours(idx)
    assert torch.equal(seen["1"], clean["blocks.1.hook_resid_pre"])
    assert torch.equal(seen["2"], clean["blocks.2.hook_resid_pre"])
    assert (seen["3"] - clean["blocks.2.hook_resid_post"]).abs().max() > 1e-3
    assert (edited - logits).abs().max() > 1e-3


def test_sliding_windows_apply_per_layer(family):
    """Layer by layer through the seam: moving position 0 of a layer's input moves the last position's output only
    where the layer attends globally; a sliding window of 8 keeps position 0 out of position 23's view."""
    model_type, _, ours, _ = family
    noise = torch.randn(ours.config.n_embd, generator=torch.Generator().manual_seed(0))  # not a constant shift,
    # which a LayerNorm would remove
    with torch.no_grad():
        x = ours.embed(tokens(B=1, seed=5))
        for L, sliding in enumerate(SLIDING.get(model_type, [False] * 3)):
            moved = x.clone()
            moved[:, 0] += noise.to(x.dtype)
            out = ours.run_blocks(x, L, L + 1)
            changed = (out[:, -1] - ours.run_blocks(moved, L, L + 1)[:, -1]).abs().max().item() > 1e-6
            assert changed != sliding, f"layer {L}: expected {'a sliding window' if sliding else 'global attention'}"
            x = out


def test_greedy_generation_matches_transformers_argmax(family):
    _, hf, ours, _ = family
    idx = tokens(B=1, seed=6)[:, :5]
    expected = idx
    with torch.no_grad():
        for _ in range(4):
            expected = torch.cat([expected, hf(expected).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(ours.generate(idx, 4, temperature=0), expected)


def test_errors_say_what_is_valid(family):
    _, _, ours, _ = family
    with pytest.raises(ValueError, match=r"blocks\.\{0\.\.2\}\.hook_resid_pre"):
        ours.resid_index("blocks.3.hook_resid_pre")
    with pytest.raises(ValueError, match=r"blocks\.\{0\.\.2\}"):
        ours(tokens(), edits={"blocks.1.resid": lambda x: x})
    with pytest.raises(ValueError, match=rf"\[0, {VOCAB}\)"):
        ours(torch.tensor([[0, VOCAB]]))
    with pytest.raises(ValueError, match="block_size 64"):
        ours(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        ours.embed(torch.zeros(1, 4))


def test_gemma2_soft_caps_bind_and_attention_is_eager(saved):
    """The Gemma 2 test model's caps change its outputs, so matching it checks them (attention's cap runs only in
    eager attention)."""
    hf, ours, _ = saved("gemma2")
    assert ours.hf.config._attn_implementation == "eager" and ours.logit_softcap == 3.0
    idx = tokens(seed=7)
    with torch.no_grad():
        uncapped_attention = random_model("gemma2", attn_logit_softcapping=None)(idx).logits
        assert (uncapped_attention - hf(idx).logits).abs().max() > 1e-2
        x = ours.run_blocks(ours.embed(idx), 0)
        assert (ours.unembed(x) - F.linear(ours.final_norm(x), ours.head_weight)).abs().max() > 1e-1


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_bfloat16_matches_transformers_in_bfloat16(model_type, saved):
    """dtype reaches the library: the stream is bfloat16 (Gemma's sqrt(d) scaling done in it) and the logits equal
    the library's own bfloat16 logits."""
    from transformers import AutoModelForCausalLM
    directory = saved(model_type)[2]
    ours = HFModel.from_pretrained(directory, dtype=torch.bfloat16)
    theirs = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()
    idx = tokens(seed=8)
    with torch.no_grad():
        assert ours.embed(idx).dtype == torch.bfloat16
        torch.testing.assert_close(ours(idx), theirs(idx).logits, atol=0, rtol=0)


def test_unsupported_layouts_are_refused(tmp_path):
    from transformers import AutoModelForCausalLM, BertConfig, T5Config, T5ForConditionalGeneration
    t5 = str(tmp_path / "t5")
    T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
                               ).save_pretrained(t5)
    with pytest.raises(ValueError, match="'t5' is not a decoder-only causal language model.*supported"):
        HFModel.from_pretrained(t5)
    bert = str(tmp_path / "bert")  # transformers loads BERT as a causal LM, but its layers sit in an encoder
    AutoModelForCausalLM.from_config(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=64)).save_pretrained(bert)
    with pytest.raises(ValueError, match="found 0 lists of 2 decoder layers.*supported"):
        HFModel.from_pretrained(bert)
    with pytest.raises(ValueError, match="holds no config.json"):
        HFModel.from_pretrained(str(tmp_path))


def test_a_hub_id_offline_fails_saying_what_to_do():
    code = ("from hf_model import HFModel\n"
            "try:\n    HFModel.from_pretrained('no-such-user/no-such-model')\n"
            "except RuntimeError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert "'no-such-user/no-such-model' is not a local directory" in out.stdout, out.stderr[-2000:]
    assert "pass the directory" in out.stdout


def test_imports_without_transformers():
    code = "import sys; sys.modules['transformers'] = None; import hf_model, model; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
