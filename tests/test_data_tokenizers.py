"""data.py with a model's own tokenizer (tokenizer=a directory in the hub's layout) against the definition of its
stream, written out here: each raw-text document tokenised without special tokens and followed by the tokenizer's
EOS, pre-tokenised rows as they are, cut into samples of n_ctx tokens, or of BOS + n_ctx - 1 tokens where encoding
puts BOS in front. Three small tokenizers (conftest.py): Llama-like (BOS in front), Pythia-like (a BOS token that
encoding does not add), and one whose ids pass 65,535. With the token cache keyed by the tokenizer (GPT-2's entries
where they always were), its ids as uint32 where they need it, and ids past the model's vocabulary refused."""
import hashlib
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from test_data import as_lists, forget, play_text, take, write_parquet

import data

N_CTX = 32
BOS = 1  # <|begin_of_text|> of the Llama-like tokenizer
TOKENIZERS = {"pythia-like": ("plain_tokenizer_dir", None), "llama-like": ("bos_tokenizer_dir", BOS),
              "17-bit ids": ("wide_tokenizer_dir", None)}


def hf_tokenizer(directory):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def definition(docs, tok, n_ctx=N_CTX, bos=None):
    """The stream, as a list of samples (lists of ints): what data.py must produce for these documents."""
    tokens = []
    for d in docs:
        if isinstance(d, str):
            tokens += tok.encode(d, add_special_tokens=False, split_special_tokens=True) + [tok.eos_token_id]
        else:
            tokens += list(d)
    head = [] if bos is None else [bos]
    body = n_ctx - len(head)
    return [head + tokens[i:i + body] for i in range(0, len(tokens) - body + 1, body)]


@pytest.fixture
def documents_dir(tmp_path_factory):
    """25 documents (the documents rule holds out the 20th), one of them with special-token text in it."""
    folder = tmp_path_factory.mktemp("documents")
    for i in range(25):
        text = play_text(i, 1000, 1500 + 37 * i) + (" <|endoftext|> <|begin_of_text|>" if i == 3 else "")
        (folder / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    return str(folder)


def texts_of(folder):
    return [open(os.path.join(folder, f), encoding="utf-8").read() for f in sorted(os.listdir(folder))]


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_local_text_is_tokenised_with_the_models_tokenizer(kind, documents_dir, request):
    tokenizer, bos = request.getfixturevalue(TOKENIZERS[kind][0]), TOKENIZERS[kind][1]
    tok, texts = hf_tokenizer(tokenizer), texts_of(documents_dir)
    train = [t for i, t in enumerate(texts) if i % 20 != 19]
    assert data.bos_token_id(tokenizer) == bos and tok.bos_token_id is not None  # the Pythia-like has one, unused

    ids = data.token_file(documents_dir, "train", tokenizer)  # each document, then EOS: it decodes to the text
    ends = np.flatnonzero(ids == tok.eos_token_id)
    assert len(ends) == len(train)
    assert [tok.decode(part[:-1]) for part in np.split(np.asarray(ids), ends + 1)[:-1]] == train
    assert ids.dtype == (np.uint32 if kind == "17-bit ids" else np.uint16)
    if kind == "17-bit ids":
        assert ids.max() > 65_535 and (ids > 65_535).mean() > 0.9  # every id but EOS's survived 32 bits

    samples = as_lists(data.token_samples(documents_dir, N_CTX, "train", repeat=False, tokenizer=tokenizer))
    assert samples == definition(train, tok, bos=bos) and len(samples) > 100
    assert all(len(s) == N_CTX for s in samples)
    if bos is not None:
        assert all(s[0] == bos and bos not in s[1:] for s in samples)  # in front of every sample, and only there
    assert data.count_samples(documents_dir, N_CTX, "train", 10**6, tokenizer=tokenizer) == len(samples)
    held_out = definition([texts[19]], tok, bos=bos)
    assert as_lists(data.heldout_samples(documents_dir, N_CTX, 5, rank=1, world_size=2, tokenizer=tokenizer)) == \
        held_out[1:5:2]


def test_the_embedded_corpus_with_a_models_tokenizer(bos_tokenizer_dir):
    clean = ["\n".join(line.rstrip().replace("**", "") for line in open(p, encoding="utf-8").read().splitlines())
             for p in data.shakespeare_files()]
    expected = definition([clean[19]], hf_tokenizer(bos_tokenizer_dir), n_ctx=256, bos=BOS)
    assert as_lists(data.heldout_samples("shakespeare", 256, 10**6, tokenizer=bos_tokenizer_dir)) == expected


# ---- the token cache: an entry per tokenizer ----

def gpt2_entry(cache, dataset):
    """The folder of GPT-2's tokens of `dataset`, by the rule that named it before there were other tokenizers."""
    source = os.path.abspath(dataset)
    stats = [(os.path.realpath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in data.local_files(dataset)]
    key = json.dumps(dict(format=2, source=source, files=stats, markdown=False, heldout=[20, 0.02, 0.1]))
    digest = lambda s: hashlib.sha1(s.encode()).hexdigest()[:10]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(source))[:40]
    return str(cache / "tokens" / f"{name}-{digest(source)}-{digest(key)}")


def test_the_token_cache_is_keyed_by_the_tokenizer(documents_dir, plain_tokenizer_dir, bos_tokenizer_dir,
                                                   wide_tokenizer_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("E2ESAE_CACHE", str(cache))
    forget(documents_dir)
    first = as_lists(data.token_samples(documents_dir, N_CTX, repeat=False, tokenizer=plain_tokenizer_dir))
    forget(documents_dir)  # a second run, with only this tokenizer's entry: nothing is read or tokenised again
    with monkeypatch.context() as patch:
        patch.setattr(data, "_read", lambda path: pytest.fail(f"read {path} again"))
        assert as_lists(data.token_samples(documents_dir, N_CTX, repeat=False, tokenizer=plain_tokenizer_dir)) == first

    tokenizers = {"plain": plain_tokenizer_dir, "gpt2": "gpt2", "bos": bos_tokenizer_dir, "wide": wide_tokenizer_dir}
    entries = {}
    for k, tokenizer in tokenizers.items():
        entries[k] = data.token_cache(documents_dir, tokenizer)
        assert all(data._cached_meta(e)[0] for e, _ in entries.values())  # building one removed none of the others
    gpt2 = gpt2_entry(cache, documents_dir)
    assert entries["gpt2"][0] == gpt2  # GPT-2's entries stay where they were: existing caches are read
    others = [entries[k][0] for k in ("plain", "bos", "wide")]
    assert [os.path.basename(e) for e in others] == [os.path.basename(gpt2)] * 3  # the same files ...
    assert len({os.path.dirname(e) for e in others}) == 3  # ... in a folder per tokenizer
    assert all(os.path.dirname(os.path.dirname(e)) == str(cache / "tokens") for e in others)

    for k, (entry, meta) in entries.items():
        assert meta["dtype"] == ("uint32" if k == "wide" else "uint16")
        size = os.path.getsize(os.path.join(entry, "train.bin"))
        assert size == meta["tokens"]["train"] * np.dtype(meta["dtype"]).itemsize
    assert entries["wide"][1]["max_id"]["train"] > 65_535
    copy = shutil.copytree(plain_tokenizer_dir, tmp_path / "same-tokenizer")  # another name for one tokenizer
    assert data.token_cache(documents_dir, str(copy))[0] == entries["plain"][0]


# ---- samples that start with BOS still count, shard and resume by arithmetic ----

def test_bos_samples_count_shard_and_resume(documents_dir, bos_tokenizer_dir, tmp_path, monkeypatch):
    tok = hf_tokenizer(bos_tokenizer_dir)
    expected = definition([t for i, t in enumerate(texts_of(documents_dir)) if i % 20 != 19], tok, bos=BOS)
    whole = expected * 3  # epochs repeat the stream
    stream = data.SampleStream(documents_dir, N_CTX, "train", rank=1, world_size=2, tokenizer=bos_tokenizer_dir)
    assert take(stream, 30) == whole[1:60:2]
    state = stream.state_dict()
    assert state == {"kind": "tokens", "samples": 30, "world_size": 2}
    rest = take(stream, len(expected))  # into the next epoch
    again = data.SampleStream(documents_dir, N_CTX, "train", rank=1, world_size=2, tokenizer=bos_tokenizer_dir)
    again.load_state_dict(state)
    assert take(again, len(expected)) == rest == whole[61:61 + 2 * len(expected):2]
    four = data.SampleStream(documents_dir, N_CTX, "train", rank=3, world_size=4, tokenizer=bos_tokenizer_dir)
    four.load_state_dict(state)  # the 60 samples taken, shared anew
    assert take(four, 3) == whole[63:75:4]

    monkeypatch.setattr(data, "ROWS_PER_READ", 5)
    rows = [play_text(i, 500, 200 + 13 * i) for i in range(30)]  # raw text, every 20th row held out
    write_parquet(tmp_path / "text" / "train-00000-of-00001.parquet", "text", rows)
    g = np.random.default_rng(0)
    ids = [g.integers(2, 1000, size=int(g.integers(5, 120))).tolist() for _ in range(24)]  # pre-tokenised
    write_parquet(tmp_path / "ids" / "train-00000-of-00001.parquet", "input_ids", ids)
    for dataset, docs in ((str(tmp_path / "text"), rows), (str(tmp_path / "ids"), ids)):
        train = [d for i, d in enumerate(docs) if i % 20 != 19]
        assert as_lists(data.token_samples(dataset, N_CTX, repeat=False, tokenizer=bos_tokenizer_dir)) == \
            definition(train, tok, bos=BOS)
        assert data.count_samples(dataset, N_CTX, "train", 10**6, tokenizer=bos_tokenizer_dir) == \
            len(definition(train, tok, bos=BOS))
        one = take(data.SampleStream(dataset, N_CTX, rank=1, world_size=2, tokenizer=bos_tokenizer_dir), 60)
        for cut in (0, 7, 33):  # within a document, within the rows read at once, in a later epoch
            stream = data.SampleStream(dataset, N_CTX, rank=1, world_size=2, tokenizer=bos_tokenizer_dir)
            assert take(stream, cut) == one[:cut]
            torch.save(stream.state_dict(), tmp_path / "state.pt")
            again = data.SampleStream(dataset, N_CTX, rank=1, world_size=2, tokenizer=bos_tokenizer_dir)
            again.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
            assert take(again, 60 - cut) == one[cut:], (dataset, cut)


# ---- ids the model has no embedding for ----

def test_ids_past_the_models_vocabulary_are_refused_naming_both_sizes(documents_dir, plain_tokenizer_dir,
                                                                      wide_tokenizer_dir, tmp_path):
    g = np.random.default_rng(0)
    ids = [g.integers(0, 1000, size=40).tolist() for _ in range(30)]
    ids[5][2] = 70_000  # tokenised for a larger vocabulary than the model's 1,000 ids
    folder = str(tmp_path / "ids")
    write_parquet(os.path.join(folder, "train-00000-of-00001.parquet"), "input_ids", ids)
    with pytest.raises(data.DataError) as e:
        data.check_vocab(folder, 1000, tokenizer=plain_tokenizer_dir)
    assert str(e.value).startswith(f"dataset {folder!r}, document 5 of its train part holds token id 70,000, outside "
                                   "the model's vocabulary of 1,000 ids (0 to 999): the model has no embedding for it "
                                   "(the data needs a vocabulary of at least 70,001 ids)")

    data.check_vocab(documents_dir, 66_536, tokenizer=wide_tokenizer_dir)  # raw text, with the model's tokenizer
    top = data.token_cache(documents_dir, wide_tokenizer_dir)[1]["max_id"]["train"]
    message = (f"dataset {documents_dir!r} is raw text, tokenised with the tokenizer of {wide_tokenizer_dir!r}, and "
               f"its train part holds token id {top:,}, outside the model's vocabulary of 1,000 ids")
    with pytest.raises(data.DataError, match=re.escape(message)):
        data.check_vocab(documents_dir, 1000, tokenizer=wide_tokenizer_dir)


def test_a_model_without_a_tokenizer_is_named(documents_dir, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(data.DataError, match=re.escape(f"the directory {tmp_path / 'model'} holds no tokenizer")):
        data.SampleStream(documents_dir, N_CTX, tokenizer=str(tmp_path / "model"))
