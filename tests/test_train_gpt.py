"""train_gpt.py: the small model of the embedded default trains, saves, loads, caches, and is scored fairly."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import data
import train_gpt
from language_models import gpt2_tokenizer
from model import GPT, GPTConfig

TINY = dict(n_layer=1, n_head=2, n_embd=32, n_ctx=32, batch_size=8, eval_n_samples=8, log_every_n_steps=10,
            device="cpu")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny model trained for a few dozen steps on Shakespeare, saved to a directory."""
    out = str(tmp_path_factory.mktemp("tiny") / "gpt")
    summary = train_gpt.train_small_gpt(out, **TINY, n_steps=40, warmup_steps=5, lr=1e-2, eval_every_n_steps=20)
    return out, summary


def test_training_loss_falls(tiny_run):
    out, summary = tiny_run
    curve = [loss for _, loss in summary["loss_curve"]]
    assert len(curve) == 4
    assert curve[0] > curve[-1] + 1.0, curve  # from ~ln(50,257) = 10.8 down towards the unigram's ~6.5
    assert summary["steps"] == 40 and summary["tokens"] == 40 * 8 * 32
    (s20, ce20), (s40, ce40) = summary["heldout_curve"]  # held-out CE during training, and at the end
    assert (s20, s40) == (20, 40) and ce40 == round(summary["heldout_ce"], 4) and ce20 > ce40
    with open(os.path.join(out, "train_summary.json")) as f:
        assert json.load(f)["heldout_ce"] == summary["heldout_ce"]


def test_checkpoint_loads_with_the_same_logits_and_held_out_ce(tiny_run):
    out, summary = tiny_run
    gpt = GPT.from_pretrained(out).eval()
    assert (gpt.config.n_layer, gpt.config.n_embd, gpt.config.block_size) == (1, 32, 32)
    idx = torch.stack(data.heldout_samples("shakespeare", 32, 8))
    ce = train_gpt.model_cross_entropy(gpt, "shakespeare", 32, 8, batch_size=3)
    assert ce == pytest.approx(summary["heldout_ce"], rel=1e-6)  # what the in-memory model scored before saving
    # the same CE by hand, over the full 50,257-token softmax
    logits = gpt(idx[:, :-1])
    assert logits.shape == (8, 31, 50257)
    assert F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten()).item() == pytest.approx(ce, abs=1e-4)


def test_the_seen_vocabulary_loss_is_the_full_softmax_loss_of_the_saved_model():
    """Training's Unembedding (each seen token its own row, the others one shared row) gives exactly the
    cross-entropy of the model as saved, whose lm_head has all 50,257 rows."""
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=12, n_layer=2, n_head=2, n_embd=16))
    seen, head = train_gpt.seen_vocabulary(torch.randint(0, 50257, (300,)), 50257)
    unseen_row = torch.randn(16) * 0.3
    idx, targets = (seen[torch.randint(0, len(seen), (3, 12))] for _ in range(2))
    rows = torch.cat([gpt.transformer.wte.weight[seen], unseen_row[None]])
    h = gpt.final_norm(gpt.run_blocks(gpt.embed(idx)))
    loss = head.cross_entropy(head(h, rows).flatten(0, 1), targets.flatten())
    with torch.no_grad():
        gpt.transformer.wte.weight[head.token_row == len(seen)] = unseen_row
    full = F.cross_entropy(gpt(idx).flatten(0, 1), targets.flatten())
    assert loss.item() == pytest.approx(full.item(), abs=1e-5)
    assert torch.equal(head.predictions(head(h, rows)), gpt(idx).argmax(-1))  # the most likely token, too


def test_each_recipe_has_its_own_cache_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("E2ESAE_CACHE", str(tmp_path))
    default = str(tmp_path / "gpt2-shakespeare")
    assert train_gpt.small_model_dir() == default
    spelled_out = {k: v for k, v in train_gpt.DEFAULTS.items()}
    assert train_gpt.small_model_dir(**spelled_out) == default  # config/gpt_shakespeare.py names the defaults
    assert train_gpt.small_model_dir(log_every_n_steps=7, eval_every_n_steps=9) == default  # not the model
    stronger = train_gpt.small_model_dir(n_layer=6, n_embd=256)
    assert os.path.basename(stronger).startswith("gpt2-shakespeare-6x256-") and stronger != default
    assert train_gpt.small_model_dir(n_layer=6, n_embd=256, n_steps=10) != stronger


def test_ensure_small_model_trains_once_then_reuses_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("E2ESAE_CACHE", str(tmp_path / "cache"))
    expected = train_gpt.small_model_dir(**TINY, n_steps=3, warmup_steps=1)
    d = train_gpt.ensure_small_model(**TINY, n_steps=3, warmup_steps=1)
    assert d == expected
    assert "training one from scratch" in capsys.readouterr().out
    assert [d for d in os.listdir(tmp_path / "cache") if d != "tokens"] == [os.path.basename(expected)]  # no
    # temporary directory left behind (tokens/ holds data.py's token files)
    weights = os.path.join(d, "model.safetensors")
    before = os.stat(weights).st_mtime_ns
    assert train_gpt.ensure_small_model(**TINY, n_steps=3, warmup_steps=1) == expected
    assert os.stat(weights).st_mtime_ns == before
    assert capsys.readouterr().out == ""  # nothing trained, nothing printed
    GPT.from_pretrained(d)


def test_cache_dir_follows_xdg_when_e2esae_cache_is_unset(tmp_path, monkeypatch):
    monkeypatch.delenv("E2ESAE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert train_gpt.small_model_dir() == os.path.join(str(tmp_path), "e2esae", "gpt2-shakespeare")


def test_unigram_cross_entropy_matches_a_direct_count(tmp_path):
    # 20 documents: data.py holds out every 20th, so doc19 is the held-out text and doc00..doc18 the training text
    words = "the king my lord and thou art a villain to be or not that is question sweet love night".split()
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(words[i] for i in torch.randint(0, len(words), (60,), generator=g).tolist()) for _ in range(20)]
    texts[3] += " Zounds!"  # a token only the training text has
    texts[19] += " Forsooth, quoth Hamlet"  # tokens only the held-out text has: the smoothing must handle them
    for i, text in enumerate(texts):
        (tmp_path / f"doc{i:02d}.txt").write_text(text)
    n_ctx, eval_n_samples = 8, 3

    enc = gpt2_tokenizer()
    def stream(docs):
        ids = [t for d in docs for t in enc.encode_ordinary(d) + [enc.eot_token]]
        return ids[:len(ids) // n_ctx * n_ctx]  # whole samples of n_ctx tokens
    train, heldout = stream(texts[:19]), stream(texts[19:])
    counts = {}
    for t in train:
        counts[t] = counts.get(t, 0) + 1
    targets = [heldout[s + j] for s in range(0, eval_n_samples * n_ctx, n_ctx) for j in range(1, n_ctx)]
    expected = -sum(math.log((counts.get(t, 0) + 1) / (len(train) + 50257)) for t in targets) / len(targets)

    got = train_gpt.unigram_cross_entropy(str(tmp_path), n_ctx, eval_n_samples)
    assert got == pytest.approx(expected, rel=1e-9)


def test_overrides_are_checked():
    with pytest.raises(TypeError, match="n_embed"):
        train_gpt.train_small_gpt("unused", n_embed=64)


def test_retraining_into_an_existing_directory_keeps_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    train_gpt.train_small_gpt(str(tmp_path), **TINY, n_steps=2, warmup_steps=1)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors", "notes.txt", "train_summary.json"]
    assert GPT.from_pretrained(str(tmp_path)).config.n_embd == 32
