"""data.py against the definition of its stream, written out here the simple way: every document's GPT-2 tokens
(+ <|endoftext|> after raw text) concatenated, cut into consecutive n_ctx-token samples, the partial last one
dropped, the stream repeated per epoch. For local text (cached token files), the embedded corpus, and local
datasets in the hub's formats (parquet and arrow, pre-tokenised and raw text); with resuming, ranks, the cache."""
import json
import os
import pickle
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
from conftest import ROOT
from language_models import gpt2_tokenizer

N_CTX = 32


@pytest.fixture(autouse=True)
def token_cache(tmp_path_factory, monkeypatch):
    """Every test's token files in one temporary cache (the embedded corpus is tokenised once for the module)."""
    root = tmp_path_factory.getbasetemp() / "e2esae-cache"
    monkeypatch.setenv("E2ESAE_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def enc():
    return gpt2_tokenizer()


def definition(docs, enc, n_ctx=N_CTX):
    """The stream, as a list of samples (lists of ints): what data.py must produce for these documents."""
    tokens = []
    for d in docs:
        tokens += enc.encode_ordinary(d) + [enc.eot_token] if isinstance(d, str) else list(d)
    return [tokens[i:i + n_ctx] for i in range(0, len(tokens) - n_ctx + 1, n_ctx)]


def as_lists(samples):
    return [s.tolist() for s in samples]


def take(iterable, n):
    return [next(iterable).tolist() for _ in range(n)]


def play_text(i, start, chars):
    return open(data.shakespeare_files()[i], encoding="utf-8").read()[start:start + chars]


def forget(dataset):
    """What a new process knows about a source: nothing (the caches of check_source and heldout_rule hold it)."""
    data._announced.clear()
    data.check_source.cache_clear()
    data.heldout_rule.cache_clear()
    data.source_kind.cache_clear()
    data._hub_splits.cache_clear()


# ---- local text: the cached token file is today's stream ----

@pytest.fixture
def many_files(tmp_path):
    """25 documents: the documents rule holds out the 20th."""
    for i in range(25):
        (tmp_path / f"doc{i:02d}.txt").write_text(play_text(i, 1000, 1500 + 37 * i), encoding="utf-8")
    return str(tmp_path)


def test_documents_rule_matches_the_definition(many_files, enc):
    files = sorted(os.path.join(many_files, f) for f in os.listdir(many_files))
    texts = [open(f, encoding="utf-8").read() for f in files]
    assert data.heldout_rule(many_files)[0] == "documents"
    expected = {"train": definition([t for i, t in enumerate(texts) if i % 20 != 19], enc),
                "eval": definition([texts[19]], enc)}
    for split in ("train", "eval"):
        assert as_lists(data.token_samples(many_files, N_CTX, split, repeat=False)) == expected[split]
        assert data.count_samples(many_files, N_CTX, split, at_most=10**6) == len(expected[split])
    # epochs repeat the stream; rank r of W takes samples r, r + W, ... of it, epoch after epoch
    whole = expected["train"] * 3
    assert take(data.token_samples(many_files, N_CTX), len(whole)) == whole
    for rank in range(3):
        ours = whole[rank::3][:len(whole) // 3 - 1]
        assert take(data.token_samples(many_files, N_CTX, rank=rank, world_size=3), len(ours)) == ours
        assert take(data.token_samples(many_files, N_CTX, rank=rank, world_size=3, skip=40), 5) == ours[40:45]
    assert as_lists(data.heldout_samples(many_files, N_CTX, 7, rank=1, world_size=2)) == expected["eval"][1:6:2]


def test_tail_rule_matches_the_definition(tmp_path, enc):
    path = tmp_path / "input.txt"
    text = play_text(3, 0, 30_000)
    path.write_text(text, encoding="utf-8")
    assert data.heldout_rule(str(path))[0] == "tail"
    at = int(0.9 * len(text))
    at = max(text.rfind(" ", 0, at), text.rfind("\n", 0, at)) + 1  # the last space or newline before 90%
    for split, part in (("train", text[:at]), ("eval", text[at:])):
        assert as_lists(data.token_samples(str(path), N_CTX, split, repeat=False)) == definition([part], enc)


def test_the_embedded_corpus_matches_the_definition(enc):
    plays = data.shakespeare_files()
    assert len(plays) == 38
    clean = ["\n".join(line.rstrip().replace("**", "") for line in open(p, encoding="utf-8").read().splitlines())
             for p in plays]
    for split, docs in (("train", [d for i, d in enumerate(clean) if i != 19]), ("eval", [clean[19]])):
        expected = definition(docs, enc, n_ctx=256)
        assert as_lists(data.token_samples("shakespeare", 256, split, repeat=False)) == expected
    assert as_lists(data.heldout_samples("shakespeare", 256, 4)) == expected[:4]


# ---- linear time in a document's length: long documents are tokenised in pieces, cut where nothing changes ----

def test_long_texts_cut_into_pieces_tokenise_as_a_whole(enc, monkeypatch):
    rng = random.Random(0)
    words = ["the", "King", "'s", "don't", "we'll", "I've", "1600", "  ", "\n", "\n\n", "  \n", "\t", "?!", "--",
             "naïve", "Straße", "東京", "😀", "<|endoftext|>", " ", "'", "x'", "s"]
    texts = ["".join(rng.choice(words) + rng.choice(["", " ", " ", "\n"]) for _ in range(3000)) for _ in range(20)]
    texts += ["a b" * 500, "東京" * 2000, " " * 3000 + "a b c", "word " * 2000 + "   "]
    monkeypatch.setattr(data, "PIECE_CHARS", 7)  # a cut every few words
    for text in texts:
        pieces = list(data.encode_pieces(enc, text))
        assert sum(n for n, _ in pieces) == len(text)
        assert np.concatenate([ids for _, ids in pieces]).tolist() == enc.encode_ordinary(text)
    assert len(list(data.encode_pieces(enc, texts[0]))) > 100  # it did cut


def test_one_long_document(tmp_path, enc, monkeypatch):
    """One file of one long document (the case that was quadratic): the samples and their order of the definition,
    through the token file and through a raw-text stream, tokenised in many pieces."""
    text = " ".join(play_text(i, 0, 40_000) for i in range(6))
    path = tmp_path / "big.txt"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setattr(data, "PIECE_CHARS", 5000)
    at = int(0.9 * len(text))
    at = max(text.rfind(" ", 0, at), text.rfind("\n", 0, at)) + 1
    expected = definition([text[:at]], enc)
    assert len(expected) > 1000
    assert as_lists(data.token_samples(str(path), N_CTX, "train", repeat=False)) == expected
    rows = tmp_path / "rows"
    write_parquet(rows / "train-00000-of-00001.parquet", "text", [text])
    assert as_lists(data.token_samples(str(rows), N_CTX, "train", repeat=False)) == definition([text], enc)


# ---- the token cache ----

def entries(cache):
    folder = cache / "tokens"
    return sorted(p for p in os.listdir(folder) if not p.endswith(".lock")) if folder.exists() else []


def test_the_cache_is_built_once_and_follows_the_files(many_files, token_cache, capsys, monkeypatch, enc):
    first = as_lists(data.token_samples(many_files, N_CTX, repeat=False))
    out = capsys.readouterr().out
    assert "tokenising" in out and str(token_cache / "tokens") in out
    (entry,) = [e for e in entries(token_cache) if e.startswith(os.path.basename(many_files))]
    assert sorted(os.listdir(token_cache / "tokens" / entry)) == ["eval.bin", "meta.json", "train.bin"]

    forget(many_files)  # a second run: nothing is read or tokenised again
    monkeypatch.setattr(data, "_read", lambda path: pytest.fail(f"read {path} again"))
    assert as_lists(data.token_samples(many_files, N_CTX, repeat=False)) == first
    assert data.heldout_rule(many_files)[0] == "documents"
    out = capsys.readouterr().out
    assert "tokenising" not in out and f"from the cache {token_cache / 'tokens' / entry}" in out
    monkeypatch.undo()
    monkeypatch.setenv("E2ESAE_CACHE", str(token_cache))

    changed = os.path.join(many_files, "doc03.txt")  # an edited file: a new entry replaces the old one
    with open(changed, "a", encoding="utf-8") as f:
        f.write(" And one line more.")
    forget(many_files)
    list(data.token_samples(many_files, N_CTX, repeat=False))
    assert "tokenising" in capsys.readouterr().out
    texts = [open(os.path.join(many_files, f"doc{i:02d}.txt"), encoding="utf-8").read() for i in range(25)]
    assert as_lists(data.token_samples(many_files, N_CTX, repeat=False)) == definition(
        [t for i, t in enumerate(texts) if i % 20 != 19], enc)
    assert entry not in entries(token_cache)

    os.remove(os.path.join(many_files, "doc24.txt"))  # a deleted one: the same
    forget(many_files)
    assert as_lists(data.token_samples(many_files, N_CTX, repeat=False)) == definition(
        [t for i, t in enumerate(texts[:24]) if i % 20 != 19], enc)
    assert len([e for e in entries(token_cache) if e.startswith(os.path.basename(many_files))]) == 1


def test_an_interrupted_build_leaves_no_half_cache(many_files, token_cache, monkeypatch, enc):
    calls = []
    real = data.encode_pieces

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(data, "encode_pieces", interrupted)
    with pytest.raises(KeyboardInterrupt):
        next(data.token_samples(many_files, N_CTX))
    assert not [e for e in entries(token_cache) if e.startswith(os.path.basename(many_files))]  # nor a .tmp folder
    monkeypatch.setattr(data, "encode_pieces", real)
    texts = [open(os.path.join(many_files, f"doc{i:02d}.txt"), encoding="utf-8").read() for i in range(25)]
    assert as_lists(data.token_samples(many_files, N_CTX, "eval", repeat=False)) == definition([texts[19]], enc)


def test_a_symlink_loop_is_read_once_and_binary_files_are_named(tmp_path, enc):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("To be, or not to be.", encoding="utf-8")
    (tmp_path / "sub" / "b.txt").write_text("That is the question.", encoding="utf-8")
    os.symlink("..", tmp_path / "sub" / "up")  # a loop
    os.symlink("../a.txt", tmp_path / "sub" / "again.txt")  # a second name for a file
    assert data.local_files(str(tmp_path)) == [str(tmp_path / "a.txt"), str(tmp_path / "sub" / "b.txt")]
    train, held_out = data.documents(str(tmp_path), "train"), data.documents(str(tmp_path), "eval")
    assert "".join(train) + "".join(held_out) == "To be, or not to be.That is the question."  # once each

    (tmp_path / "sub" / "zeros.txt").write_bytes(bytes(1000))
    data.check_source.cache_clear()
    with pytest.raises(data.DataError, match=r"zeros.txt is not text: it holds NUL bytes"):
        data.check_source(str(tmp_path))
    os.remove(tmp_path / "sub" / "zeros.txt")
    (tmp_path / "controls.txt").write_bytes(bytes(range(1, 9)) * 100 + b"text")
    data.check_source.cache_clear()
    with pytest.raises(data.DataError, match=r"controls.txt is not text"):
        data.check_source(str(tmp_path))
    data.check_source.cache_clear()


# ---- resuming, and batches that never read ahead ----

def test_a_local_stream_resumes_by_arithmetic(many_files, enc):
    expected = definition([open(os.path.join(many_files, f), encoding="utf-8").read()
                           for i, f in enumerate(sorted(os.listdir(many_files))) if i % 20 != 19], enc)
    n = len(expected)
    stream = data.SampleStream(many_files, N_CTX, "train", rank=1, world_size=2)
    assert take(stream, 30) == expected[1:60:2]
    state = stream.state_dict()
    assert state == {"kind": "tokens", "samples": 30, "world_size": 2}
    rest = take(stream, 50)
    again = data.SampleStream(many_files, N_CTX, "train", rank=1, world_size=2)
    again.load_state_dict(pickle.loads(pickle.dumps(state)))
    assert take(again, 50) == rest
    four = data.SampleStream(many_files, N_CTX, "train", rank=3, world_size=4)  # the 60 samples taken, shared anew
    four.load_state_dict(state)
    assert take(four, 3) == expected[63:75:4]
    with pytest.raises(data.DataError, match="cannot share evenly"):
        data.SampleStream(many_files, N_CTX, world_size=7).load_state_dict(state)
    far = 400_000_000 // N_CTX  # 400M tokens in, over many epochs: one index
    again.load_state_dict({"kind": "tokens", "samples": far, "world_size": 2})
    j = 1 + 2 * far  # this rank's next sample in the stream of both ranks
    assert take(again, 2) == [expected[j % n], expected[(j + 2) % n]]


def test_batches_take_exactly_their_samples(many_files, tmp_path_factory):
    for dataset in (many_files, tokenised_parquet(tmp_path_factory.mktemp("tables"), 3)[0]):  # not in many_files
        stream = data.SampleStream(dataset, N_CTX)
        batches = data.batches(stream, 5)
        next(batches)
        next(batches)
        assert stream.state_dict()["samples"] == 10


# ---- datasets in the hub's formats, streamed ----

def write_parquet(path, column, values):
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({column: values, "meta": list(range(len(values)))}), path, row_group_size=7)


def write_arrow(path, column, values):
    import pyarrow as pa
    os.makedirs(os.path.dirname(path), exist_ok=True)
    table = pa.table({column: values})
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, table.schema) as writer:
        writer.write_table(table)


def random_docs(n, seed, low=5, high=120):
    g = np.random.default_rng(seed)
    return [g.integers(0, 50257, size=int(g.integers(low, high))).tolist() for _ in range(n)]


def tokenised_parquet(tmp_path, n_files, with_test=True, docs_per_file=30):
    """A folder as the hub stores a pre-tokenised dataset: train-0000k-of-0000n.parquet (+ test-...parquet)."""
    folder = tmp_path / f"tokenised-{n_files}"
    shards = [random_docs(docs_per_file, seed) for seed in range(n_files)]
    for k, docs in enumerate(shards):
        write_parquet(folder / f"train-{k:05d}-of-{n_files:05d}.parquet", "input_ids", docs)
    if with_test:
        write_parquet(folder / "test-00000-of-00001.parquet", "input_ids", random_docs(10, 99))
    return str(folder), shards


def text_rows(n):
    return [play_text(i % 38, 500 * (i // 38), 200 + 13 * i) for i in range(n)]


def test_local_datasets_in_the_hub_formats(tmp_path, enc):
    folder, shards = tokenised_parquet(tmp_path, 3)
    assert data.source_kind(folder) == "table" and data.heldout_rule(folder) == ("split", "its 'test' split")
    docs = [d for shard in shards for d in shard]
    assert as_lists(data.token_samples(folder, N_CTX, "train", repeat=False)) == definition(docs, enc)
    assert as_lists(data.token_samples(folder, N_CTX, "eval", repeat=False)) == definition(random_docs(10, 99), enc)
    assert take(data.token_samples(folder, N_CTX), 3 * len(definition(docs, enc))) == definition(docs, enc) * 3

    texts = text_rows(45)  # raw text and no held-out split: every 20th row is held out
    write_parquet(tmp_path / "text" / "train-00000-of-00002.parquet", "text", texts[:20])
    write_parquet(tmp_path / "text" / "train-00001-of-00002.parquet", "text", texts[20:])
    assert data.heldout_rule(str(tmp_path / "text"))[0] == "documents"
    expected = definition([t for i, t in enumerate(texts) if i % 20 != 19], enc)
    assert as_lists(data.token_samples(str(tmp_path / "text"), N_CTX, repeat=False)) == expected
    assert as_lists(data.heldout_samples(str(tmp_path / "text"), N_CTX, 100)) == definition([texts[19], texts[39]], enc)

    write_arrow(tmp_path / "arrow" / "train-00000-of-00001.arrow", "input_ids", docs)  # no test split either
    assert as_lists(data.token_samples(str(tmp_path / "arrow"), N_CTX, repeat=False)) == definition(
        [d for i, d in enumerate(docs) if i % 20 != 19], enc)
    one_file = str(tmp_path / "text" / "train-00001-of-00002.parquet")  # a file on its own: one 'train' split
    assert as_lists(data.token_samples(one_file, N_CTX, repeat=False)) == definition(
        [t for i, t in enumerate(texts[20:]) if i % 20 != 19], enc)

    write_parquet(tmp_path / "broken" / "train-00000-of-00001.parquet", "input_ids", docs[:30] + [None] + docs[31:])
    with pytest.raises(data.DataError, match="document 30 of its train part: its `input_ids` is a NoneType"):
        list(data.token_samples(str(tmp_path / "broken"), N_CTX, repeat=False))


@pytest.mark.parametrize("n_files, world_size, rank", [(3, 1, 0), (4, 2, 1), (3, 2, 0), (2, 2, 1)])
def test_a_stream_resumes_where_it_was(tmp_path, n_files, world_size, rank, monkeypatch):
    """Cut anywhere (within a document, within the rows read at once, at an epoch's end), the state continues the
    stream exactly: saved with torch.save and loaded with weights_only=True, as a checkpoint would be.
    Pre-tokenised rows, then raw text."""
    monkeypatch.setattr(data, "ROWS_PER_READ", 5)  # reads that straddle files
    folder, _ = tokenised_parquet(tmp_path, n_files, with_test=n_files != 2, docs_per_file=12)
    write_parquet(tmp_path / "text" / "train-00000-of-00001.parquet", "text", text_rows(30))
    for dataset in (folder, str(tmp_path / "text")):
        stream = data.SampleStream(dataset, N_CTX, rank=rank, world_size=world_size)
        whole = take(stream, 150)
        epoch = len(as_lists(data.SampleStream(dataset, N_CTX, rank=rank, world_size=world_size, repeat=False)))
        for cut in sorted({0, 1, 7, epoch - 1, epoch, epoch + 3, 120}):
            stream = data.SampleStream(dataset, N_CTX, rank=rank, world_size=world_size)
            assert take(stream, cut) == whole[:cut]
            torch.save(stream.state_dict(), tmp_path / "state.pt")
            again = data.SampleStream(dataset, N_CTX, rank=rank, world_size=world_size)
            again.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
            assert take(again, 150 - cut) == whole[cut:], (dataset, cut)


# ---- under data parallelism the ranks together see every training sample once per epoch ----

READER = """
import sys, torch
sys.path.insert(0, {root!r})
import data
dataset, rank, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
stream = data.SampleStream(dataset, {n_ctx}, "train", rank=rank, world_size=2, repeat=False)
torch.save([s.tolist() for s in stream], out)
"""


def read_in_two_processes(dataset, tmp_path):
    tmp_path = tmp_path.parent / (tmp_path.name + "-samples")  # beside the data, not in it
    tmp_path.mkdir()
    script = READER.format(root=ROOT, n_ctx=N_CTX)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", script, dataset, str(r), str(tmp_path / f"rank{r}.pt")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        outs.append(out)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)], outs


def test_two_processes_share_a_local_corpus(many_files, tmp_path, enc):
    ranks, outs = read_in_two_processes(many_files, tmp_path)
    assert sum("tokenising" in out for out in outs) == 1  # one builds the token files, the other waits for them
    whole = as_lists(data.token_samples(many_files, N_CTX, repeat=False))
    assert ranks[0] == whole[0::2] and ranks[1] == whole[1::2]


@pytest.mark.parametrize("n_files", [4, 3])  # whole shards each (4 files), every other row (3 files)
def test_two_processes_share_a_parquet_dataset(tmp_path, n_files, enc):
    folder, shards = tokenised_parquet(tmp_path, n_files)
    ranks, _ = read_in_two_processes(folder, tmp_path)
    rows = [d for shard in shards for d in shard]
    if n_files == 4:  # rank r reads shards r, r + 2
        parts = [[d for k in (r, r + 2) for d in shards[k]] for r in range(2)]
    else:
        parts = [rows[r::2] for r in range(2)]
    assert ranks == [definition(part, enc) for part in parts]
    assert sorted(map(tuple, parts[0] + parts[1])) == sorted(map(tuple, rows))  # every document once
    every = [tuple(s) for r in ranks for s in r]
    assert len(set(every)) == len(every)  # and no sample twice


def test_the_documents_rule_counts_rows_over_the_whole_stream(monkeypatch, enc):
    """Held-out rows are every 20th of the whole stream, whatever the number of ranks (plain rows stand in for a
    hub stream, offline)."""
    rows = [{"text": f"document {i}"} for i in range(80)]
    monkeypatch.setattr(data, "_hub_splits", lambda name: {"train": rows})
    data.heldout_rule.cache_clear()
    train = [r["text"] for i, r in enumerate(rows) if i % 20 != 19]
    ranks = [as_lists(data.token_samples("owner/rows", 4, rank=r, world_size=3, repeat=False)) for r in range(3)]
    assert ranks == [definition([t for t in train if int(t.split()[1]) % 3 == r], enc, 4) for r in range(3)]
    stream = data.SampleStream("owner/rows", 4, rank=2, world_size=3)
    first = take(stream, 9)
    again = data.SampleStream("owner/rows", 4, rank=2, world_size=3)
    again.load_state_dict(stream.state_dict())
    assert first + take(again, 20) == take(data.SampleStream("owner/rows", 4, rank=2, world_size=3), 29)
    with pytest.raises(data.DataError, match="resumes with the same number of processes"):
        data.SampleStream("owner/rows", 4, rank=1, world_size=3).load_state_dict(stream.state_dict())
    data.heldout_rule.cache_clear()


# ---- bad data, found before any training and named ----

def bad_rows(tmp_path, bad):
    """A pre-tokenised folder (train + test parquet) whose rows {(split, row): id} hold an id at their 3rd token."""
    folder = tmp_path / "bad"
    docs = {"train": random_docs(100, 0), "test": random_docs(10, 99)}
    for (split, row), token in bad.items():
        docs[split][row][2] = token
    for split, rows in docs.items():
        write_parquet(folder / f"{split}-00000-of-00001.parquet", "input_ids", rows)
    return str(folder)


def test_token_ids_outside_the_models_vocabulary_are_named_with_their_row(tmp_path):
    early = bad_rows(tmp_path / "early", {("train", 37): 50_300})  # read at start-up
    with pytest.raises(data.DataError) as e:
        data.check_vocab(early, 50257)
    assert str(e.value).startswith(f"dataset {early!r}, document 37 of its train part holds token id 50,300, outside "
                                   "the model's vocabulary of 50,257 ids (0 to 50,256)")
    with pytest.raises(data.DataError, match="document 3 of its eval part holds token id -1,"):
        data.check_vocab(bad_rows(tmp_path / "negative", {("test", 3): -1}), 50257)

    late = bad_rows(tmp_path / "late", {("train", 90): 60_000})  # past the rows read at start-up: named when drawn
    data.check_vocab(late, 50257)
    stream = data.SampleStream(late, N_CTX, vocab_size=50257)
    with pytest.raises(data.DataError, match="document 90 of its train part holds token id 60,000"):
        for _ in range(10_000):
            next(stream)
    assert len(as_lists(data.SampleStream(late, N_CTX, repeat=False))) > 100  # unchecked without a vocab_size

    held_out = data.heldout_samples(late, N_CTX, 4)  # samples read before the model was known
    data.check_vocab(late, 50257, heldout=held_out)
    with pytest.raises(data.DataError, match=r"held-out sample 2 of dataset .* holds token id 50,300, outside the "
                                             r"model's vocabulary of 50,257 ids"):
        data.check_vocab(late, 50257, heldout=[torch.stack(held_out[:2]), torch.full((N_CTX,), 50_300)])


def test_local_text_is_checked_against_the_vocabulary_by_its_largest_id(many_files, token_cache):
    data.check_vocab(many_files, 50257)
    (entry,) = [e for e in entries(token_cache) if e.startswith(os.path.basename(many_files))]
    with open(token_cache / "tokens" / entry / "meta.json") as f:
        assert json.load(f)["max_id"] == {"train": 50256, "eval": 50256}  # <|endoftext|>, after every document
    message = (f"dataset {many_files!r} is raw text, tokenised with GPT-2's tokenizer, and its train part holds "
               "token id 50,256, outside the model's vocabulary of 1,000 ids")
    with pytest.raises(data.DataError, match=re.escape(message)):
        data.check_vocab(many_files, 1000)
    with pytest.raises(data.DataError, match=re.escape(message)):
        data.SampleStream(many_files, N_CTX, vocab_size=1000)


@pytest.mark.parametrize("damage", ["cut short", "overwritten", "overwritten, checked in blocks", "meta.json"])
def test_a_damaged_token_cache_is_named_and_built_again(many_files, token_cache, capsys, monkeypatch, damage):
    if damage.endswith("blocks"):  # a file larger than 4 blocks of 4 KiB: its checksum reads 4 blocks of it
        monkeypatch.setattr(data, "CHECKSUM_BLOCKS", 4)
    expected = as_lists(data.token_samples(many_files, N_CTX, repeat=False))
    (entry,) = [e for e in entries(token_cache) if e.startswith(os.path.basename(many_files))]
    folder = token_cache / "tokens" / entry
    train = folder / "train.bin"
    size = train.stat().st_size
    assert size > 4 * 4096
    if damage == "cut short":
        n = json.loads((folder / "meta.json").read_text())["tokens"]["train"]
        os.truncate(train, size // 2)
        why = f"train.bin holds {size // 2:,} bytes, not the {size:,} of its {n:,} tokens"
    elif damage.startswith("overwritten"):
        with open(train, "r+b") as f:
            f.seek(size // 3)
            f.write(np.random.default_rng(0).integers(0, 256, size // 3, dtype=np.uint8).tobytes())
        why = "train.bin does not match its checksum"
    else:
        (folder / "meta.json").write_text('{"tokens": {"train"')
        why = "its meta.json cannot be read"
    forget(many_files)
    capsys.readouterr()
    assert as_lists(data.token_samples(many_files, N_CTX, repeat=False)) == expected
    out = capsys.readouterr().out
    assert f"data: the token cache {folder} is damaged ({why}" in out and "tokenising" in out
    forget(many_files)
    assert as_lists(data.token_samples(many_files, N_CTX, repeat=False)) == expected
    assert "is damaged" not in capsys.readouterr().out  # built again once


def test_an_empty_parquet_file_is_named(tmp_path):
    folder, _ = tokenised_parquet(tmp_path, 2)
    empty = os.path.join(folder, "train-00001-of-00002.parquet")
    open(empty, "wb").close()
    with pytest.raises(data.DataError, match=re.escape(f"data file {empty} of dataset {folder!r} is empty (0 bytes)")):
        data.SampleStream(folder, N_CTX)
    forget(folder)
    write_parquet(empty, "input_ids", [])
    with pytest.raises(data.DataError, match=re.escape(f"data file {empty} of dataset {folder!r} holds no rows")):
        data.SampleStream(folder, N_CTX)
    forget(empty)
    with pytest.raises(data.DataError, match="holds no rows"):
        data.SampleStream(empty, N_CTX)


def test_a_folder_of_text_and_parquet_files_is_refused(tmp_path):
    folder = tmp_path / "mixed"
    write_parquet(folder / "train-00000-of-00001.parquet", "input_ids", random_docs(30, 0))
    for i in range(3):
        (folder / f"notes{i}.txt").write_text(play_text(i, 0, 2000), encoding="utf-8")
    for dataset in (str(folder), f"{folder}/*"):
        with pytest.raises(data.DataError) as e:
            data.SampleStream(dataset, N_CTX)
        message = str(e.value)
        assert message.startswith(f"dataset {dataset!r} mixes 1 parquet/arrow file(s) (train-00000-of-00001.parquet) "
                                  "and 3 other file(s) (notes0.txt, notes1.txt, notes2.txt)")
        assert f"--dataset='{folder}/*.txt'" in message and f"--dataset='{folder}/*.parquet'" in message
    assert data.source_kind(f"{folder}/*.txt") == "text" and data.source_kind(f"{folder}/*.parquet") == "table"
    (tmp_path / "card").mkdir()  # a hub dataset's card beside its files is no text of the dataset
    write_parquet(tmp_path / "card" / "train-00000-of-00001.parquet", "input_ids", random_docs(30, 0))
    (tmp_path / "card" / "README.md").write_text("---\nlicense: mit\n---\n# A dataset\n")
    assert data.source_kind(str(tmp_path / "card")) == "table"


def test_a_mistyped_local_path_is_named_as_a_missing_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()
    for typo in (str(tmp_path / "data" / "my_corpus.txt"), "./my_corpus.txt", "~/no-such-e2esae-corpus.txt",
                 "corpus/my_corpus.txt"):
        with pytest.raises(data.DataError) as e:
            data.SampleStream(typo, N_CTX)
        message = str(e.value)
        assert message.startswith(f"dataset {typo!r} does not exist (a local path") and "Hugging Face" not in message
    assert data.source_kind("owner/name") == "hub"  # no folder 'owner' here: a dataset on the hub
