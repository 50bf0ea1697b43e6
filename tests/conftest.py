"""Shared fixtures: small random GPT-2s saved in Hugging Face's format or ours, a little real text, and small
tokenizers in the hub's layout (a Llama-like one that puts BOS in front, a Pythia-like one, one with 17-bit ids)."""
import functools
import json
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


@pytest.fixture
def backend(monkeypatch):
    """Set E2ESAE_BACKEND (the kernels' choice of implementation) for one test: backend("triton")."""
    return lambda name: monkeypatch.setenv("E2ESAE_BACKEND", name)


def assert_close(actual, expected, tol, name=""):
    """actual within tol x the largest magnitude of expected (a kernel against its reference), and finite."""
    assert actual is not None and expected is not None, f"{name}: a gradient is missing"
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} vs {expected.shape}"
    assert torch.isfinite(actual).all(), f"{name}: not finite"
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1e-6)
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol} x {scale:.3g}"


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
    from language_models import save_pretrained
    from model import GPT, GPTConfig
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


# ---- small tokenizers in the hub's layout, for models other than GPT-2 ----

@functools.cache
def _trained_bpe():
    """A byte-level BPE of 1,000 tokens trained on three plays, as tokenizer.json text: <|endoftext|> is id 0 and
    <|begin_of_text|> id 1. Trained once per process (a fraction of a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    import data
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>", "<|begin_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([open(p, encoding="utf-8").read() for p in data.shakespeare_files()[:3]], trainer)
    return tok.to_str()


def save_bpe_tokenizer(directory, bos=False, wide_ids=False):
    """Save a small byte-level BPE tokenizer in the hub's layout (tokenizer.json, tokenizer_config.json), beside a
    model's config.json and weights or on its own; transformers' AutoTokenizer loads it from `directory`.

        bos=False      Pythia-like: <|endoftext|> (id 0) is its BOS and its EOS, and encoding adds neither
        bos=True       Llama-like: encoding puts <|begin_of_text|> (id 1) in front (a TemplateProcessing
                       post-processor, as Llama 3's and Gemma's tokenizer.json have); EOS <|endoftext|> (id 0)
        wide_ids=True  every token but the two special ones moves up by 65,536 ids and unused tokens fill the ids
                       between: a vocabulary of 66,536 ids (a model needs vocab_size >= 66,536), and every id of a
                       text's tokens is past 65,535, as Llama 3's (128,256) and Gemma's (256,000) are
    Without wide_ids the vocabulary is 1,000 ids."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast
    spec = json.loads(_trained_bpe())
    if wide_ids:
        special = {t["id"] for t in spec["added_tokens"]}
        vocab = {t: i if i in special else i + (1 << 16) for t, i in spec["model"]["vocab"].items()}
        used = set(vocab.values())
        vocab.update({f"<unused_{i}>": i for i in range(max(used)) if i not in used})
        spec["model"]["vocab"] = vocab
    tok = Tokenizer.from_str(json.dumps(spec))
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>" if bos else "<|endoftext|>",
                            eos_token="<|endoftext|>").save_pretrained(str(directory))
    return str(directory)


@pytest.fixture(scope="session")
def bos_tokenizer_dir(tmp_path_factory):
    """A Llama-like tokenizer: encoding puts BOS (<|begin_of_text|>, id 1) in front; 1,000 ids."""
    return save_bpe_tokenizer(tmp_path_factory.mktemp("tokenizer_bos"), bos=True)


@pytest.fixture(scope="session")
def plain_tokenizer_dir(tmp_path_factory):
    """A Pythia-like tokenizer: its BOS and EOS are <|endoftext|> (id 0), and encoding adds no BOS; 1,000 ids."""
    return save_bpe_tokenizer(tmp_path_factory.mktemp("tokenizer_plain"))


@pytest.fixture(scope="session")
def wide_tokenizer_dir(tmp_path_factory):
    """A Pythia-like tokenizer whose vocabulary passes 16 bits (66,536 ids): every id of text is past 65,535."""
    return save_bpe_tokenizer(tmp_path_factory.mktemp("tokenizer_wide"), wide_ids=True)
