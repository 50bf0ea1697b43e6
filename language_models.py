"""
Every language model an SAE can be spliced into, loaded by one function: load_model(init_from).

    gpt = load_model("gpt2")                        # OpenAI's GPT-2 (-medium, -large, -xl): model.py, from the hub
    gpt = load_model("gpt2-small")                  # TransformerLens's names, as the reference library writes them
    gpt = load_model("path/to/dir")                 # a directory in the hub's layout: config.json + weights
    gpt = load_model("EleutherAI/pythia-160m")      # any other causal LM, through transformers (hf_model.py)
    gpt = load_model("google/gemma-2-2b", dtype=torch.bfloat16)

GPT-2 (a name above, or a directory whose config.json says model_type 'gpt2') is this project's own model.py; any
other family is hf_model.HFModel, the library's own modules behind the same seam: embed, run_blocks, final_norm,
the head (head_weight, head_bias, logit_softcap), resid_index. What comes back is frozen (no gradients) and in eval
mode. The embedded default's small GPT-2 ('shakespeare' in train.py) is a directory like any other: train_gpt.py
trains it, caches it and says where.

Beside loading: save_pretrained(gpt, directory) writes a GPT-2 in that layout, gpt2_tokenizer() is GPT-2's BPE
(offline where openai-whisper is installed), and Unembedding is the lm_head as the losses read it, any model's.
"""

import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from configurator import ConfigError
from model import GPT, HUB_REPOS

# TransformerLens's and SAELens's names (what the reference library's configs and SAELens's cfg.json write) -> the hub
ALIASES = {"gpt2-small": "gpt2"}
HUB_OWNERS = {"pythia-": "EleutherAI", "gemma-": "google"}  # e.g. pythia-70m-deduped, gemma-2-2b


def hub_name(init_from):
    """The name load_model reads a model by: a GPT-2 name, a directory, or a hub id."""
    name = ALIASES.get(init_from, init_from)
    owner = next((o for prefix, o in HUB_OWNERS.items() if name.startswith(prefix) and "/" not in name), None)
    return f"{owner}/{name}" if owner and not os.path.exists(name) else name


def is_gpt2(name):
    """Whether model.py's GPT reads it: OpenAI's GPT-2 by name, or a directory of model_type 'gpt2'."""
    if not os.path.isdir(name):
        return name in HUB_REPOS
    config = os.path.join(name, "config.json")
    if not os.path.isfile(config):
        return False
    with open(config) as f:
        return json.load(f).get("model_type", "gpt2") == "gpt2"


def tokenizer_of(model):
    """The tokenizer a model reads (data.py's `tokenizer` argument), from a loaded model or its init_from: 'gpt2' for
    every model model.py reads (OpenAI's, a GPT-2 directory, the embedded default's 'shakespeare'), else the model's
    own directory or hub id, whose tokenizer files transformers loads."""
    if not isinstance(model, str):
        return "gpt2" if isinstance(model, GPT) else model.name_or_path
    return "gpt2" if model == "shakespeare" or is_gpt2(hub_name(model)) else hub_name(model)


def load_model(init_from, dtype=None):
    """The frozen model `init_from` names (see the docstring). dtype (e.g. torch.bfloat16) loads another family's
    weights in that dtype, which halves a large model's memory; GPT-2's stay float32 (a run's autocast does the
    rest)."""
    name = hub_name(init_from)
    if not is_gpt2(name):
        from hf_model import HFModel
        model = HFModel.from_pretrained(name, dtype)
    else:
        model = GPT.from_pretrained(name)
    return model.requires_grad_(False).eval()


def check_context(model, n_ctx):
    """Refuse, as a setting, samples of n_ctx tokens longer than the model's context."""
    if n_ctx > model.config.block_size:
        raise ConfigError(f"n_ctx={n_ctx} is longer than the model's context of {model.config.block_size} tokens: use "
                          f"--n_ctx={model.config.block_size} or less")


def save_pretrained(model, directory):
    """Write `model` in the layout `GPT.from_pretrained` (and Hugging Face) reads: config.json + model.safetensors."""
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    c = model.config
    hf = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_positions=c.block_size, n_ctx=c.block_size,
              vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
              layer_norm_epsilon=c.layer_norm_eps, activation_function="gelu_new")
    sd = {}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        if key.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            t = t.t()
        sd[key] = t.detach().contiguous().cpu()
    save_file(sd, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)


def gpt2_tokenizer():
    """GPT-2's BPE tokenizer (tiktoken's r50k_base). Works offline when the `openai-whisper` package is installed
    (it ships the identical vocabulary file); otherwise tiktoken downloads and caches it on first use."""
    import importlib.util

    import tiktoken
    spec = importlib.util.find_spec("whisper")
    vocab = os.path.join(os.path.dirname(spec.origin), "assets", "gpt2.tiktoken") if spec and spec.origin else None
    if vocab is None or not os.path.isfile(vocab):
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:
            raise RuntimeError("GPT-2's vocabulary is not available offline: `pip install --no-deps openai-whisper` "
                               f"ships it, or run once with a network ({type(e).__name__}: {e})") from e
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=load_tiktoken_bpe(vocab),
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


class Unembedding(nn.Module):
    """The unembedding as the losses read it, any model's: logits = cap tanh((h W^T) / cap) + b, with identical rows
    of W merged into one logit each, exactly.

    W (V, d) is the lm_head; the soft cap is Gemma 2's (none elsewhere); b is the lm_head's bias where a model has
    one. Tokens whose rows (and biases) are equal always get equal logits. (The embedded default's small model gives
    the ~31,000 tokens that never occur in Shakespeare one shared row; see train_gpt.py.) If n_r tokens share row r,
    whose logit is z_r, a softmax over the V tokens is a softmax over the U distinct rows with log n_r added:

        P(row r) = n_r exp(z_r) / sum_s n_s exp(z_s),       p(token v) = P(row of v) / n_(row of v)

    So p_orig(v) / p_new(v) is the same for every token of a row: a KL divergence or a statistical distance over
    rows equals the one over tokens; a token's cross-entropy is its row's plus log n_(row); and the most likely
    token is the first of the most likely row (ties go to the lower id, as argmax over tokens does). The head, often
    most of a step's FLOPs in a narrow model, costs U / V as much. Without repeated rows U = V, every log n_r is 0
    and this is the plain lm_head.

        head = Unembedding.of(gpt)      # a frozen model's head (head_weight, head_bias, logit_softcap), rows merged
        logits = head(h)                # (..., U): the rows' logits, b or log n_r added
        head.cross_entropy(logits, targets), head.predictions(logits)    # over tokens again
    """

    def __init__(self, token_row, rows=None, bias=None, softcap=None):
        """token_row (V,): the row of each token, rows 0..U-1; rows (U, d), or None where forward is given them;
        bias (U,): the lm_head's own, added after the cap (log n_r where rows are merged)."""
        super().__init__()
        n_rows, V = int(token_row.max()) + 1, len(token_row)
        first = torch.full((n_rows,), V, device=token_row.device)
        first.scatter_reduce_(0, token_row, torch.arange(V, device=token_row.device), "amin")
        if isinstance(rows, nn.Parameter):
            self.weight = rows  # (V, d) the lm_head's own weight, shared: moved with the model, never copied
        else:
            self.register_buffer("weight", rows, persistent=False)  # (U, d) the distinct rows, or None: per call
        log_count = torch.bincount(token_row, minlength=n_rows).float().log()  # (U,) log n_r
        self.register_buffer("log_count", log_count, persistent=False)
        self.register_buffer("bias", log_count if bias is None else bias.detach().float(), persistent=False)
        self.register_buffer("token_row", token_row, persistent=False)  # (V,) the row of each token
        self.register_buffer("row_token", first, persistent=False)  # (U,) the first token of each row
        self.softcap = softcap

    @classmethod
    def of(cls, model):
        """A frozen model's head (its head_weight (V, d), head_bias and logit_softcap), its identical rows found."""
        weight, bias, softcap = model.head_weight, model.head_bias, model.logit_softcap
        if bias is not None and softcap is not None:
            raise ValueError("an lm_head bias under a logit soft cap: no model this project loads has both")
        identity = torch.arange(len(weight), device=weight.device)
        direction = torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.device)
        probe = weight.detach().float() @ direction  # (V,)
        if bias is not None or len(torch.unique(probe)) == len(weight):  # distinct projections: distinct rows
            return cls(identity, weight, bias, softcap)  # the weight itself, in token order (no copy)
        rows, token_row = torch.unique(weight.detach(), dim=0, return_inverse=True)
        if len(rows) == len(weight):
            return cls(identity, weight, None, softcap)
        return cls(token_row, rows, softcap=softcap)

    def forward(self, h, rows=None):
        """The U row logits of the normed stream h; `rows` replaces the stored ones (training)."""
        weight = self.weight if rows is None else rows
        if self.softcap is None:  # the bias added by the matmul itself: one pass over the (..., U) logits fewer
            return F.linear(h, weight, self.bias.to(h.dtype))
        logits = F.linear(h, weight)
        return self.softcap * torch.tanh(logits / self.softcap) + self.bias.to(logits.dtype)

    def cross_entropy(self, logits, targets):
        """Mean cross-entropy over tokens of row logits (N, U) against token ids (N,): the row's, plus log n_row."""
        rows = self.token_row[targets]
        return F.cross_entropy(logits.float(), rows) + self.log_count[rows].mean()

    def predictions(self, logits):
        """The most likely token at each position of row logits (..., U)."""
        return self.row_token[(logits - self.log_count).argmax(-1)]
