"""
GPT-2 from scratch, in one file, with a residual stream you can read and replace.

This is the model every SAE in this project is spliced into. It follows OpenAI's GPT-2 (Radford et al.,
2019) exactly enough to load its released weights and reproduce Hugging Face's logits:

    tokens -> wte + wpe -> [Block] x n_layer -> ln_f -> lm_head (tied to wte) -> logits
    Block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))

The residual stream between blocks is addressed by TransformerLens' names, the names the reference
`e2e_sae` library and its checkpoints use:

    blocks.{i}.hook_resid_pre   the stream entering block i    (residual index i)
    blocks.{i}.hook_resid_post  the stream leaving block i     (residual index i + 1)

so `blocks.5.hook_resid_post` and `blocks.6.hook_resid_pre` are the same tensor. The seam for splicing is
three plain methods, no hook framework:

    x = gpt.embed(idx)                  # residual index 0
    x = gpt.run_blocks(x, start, stop)  # residual index start -> residual index stop
    logits = gpt.unembed(x)             # from residual index n_layer

and `gpt(idx, edits={"blocks.6.hook_resid_pre": fn})` replaces the stream at a position with `fn(stream)`.

Usage:
    gpt = GPT.from_pretrained("gpt2")             # OpenAI's weights from the Hugging Face hub
    gpt = GPT.from_pretrained("path/to/dir")      # config.json + model.safetensors, offline
    enc = gpt2_tokenizer()                        # language_models.py
    out = gpt.generate(torch.tensor([enc.encode("Hello")]), max_new_tokens=20)
"""

import json
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest context (number of learned positions)
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    bias: bool = True  # GPT-2 has biases in every Linear and LayerNorm
    layer_norm_eps: float = 1e-5


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads
        return self.c_proj(y)


class FeedForward(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's "gelu_new"


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = FeedForward(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


_POSITION = re.compile(r"blocks\.(\d+)\.hook_resid_(pre|post)")


def check_token_ids(idx, vocab_size, block_size):
    """Refuse, saying what is wrong, what no embedding can read: anything but token ids (B, T) of an integer
    dtype, a sequence longer than the context, an id outside the vocabulary."""
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype not in (torch.int32, torch.int64):
        got = f"{tuple(idx.shape)} {idx.dtype}" if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise ValueError(f"expected token ids as an integer tensor of shape (batch, seq_len), got {got}")
    if idx.shape[1] > block_size:
        raise ValueError(f"sequence of length {idx.shape[1]} is longer than the model's block_size {block_size}; "
                         "crop it (idx[:, -block_size:])")
    if idx.numel() and (idx.min() < 0 or idx.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got values in "
                         f"[{idx.min().item()}, {idx.max().item()}]")


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2 scales the init of the projections that write into the residual stream by 1/sqrt(2 n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def layers(self):
        """The blocks, in order (the name every model of language_models.py gives them)."""
        return self.transformer.h

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    # ---- the residual stream, by name ----

    def positions(self):
        """Every valid residual-stream position name."""
        return [f"blocks.{i}.hook_resid_{kind}" for kind in ("pre", "post") for i in range(self.config.n_layer)]

    def resid_index(self, name):
        """Map a position name to its residual index: resid_pre of block i is i, resid_post of block i is i+1."""
        m = _POSITION.fullmatch(name) if isinstance(name, str) else None
        if m is None or int(m.group(1)) >= self.config.n_layer:
            valid = ", ".join(f"blocks.{{0..{self.config.n_layer - 1}}}.hook_resid_{k}" for k in ("pre", "post"))
            raise ValueError(f"unknown residual position {name!r}; this {self.config.n_layer}-layer model has {valid}")
        return int(m.group(1)) + (m.group(2) == "post")

    # ---- the seam: embed, run a range of blocks, unembed ----

    def embed(self, idx):
        """Token ids (B, T) -> the residual stream entering block 0, (B, T, n_embd)."""
        check_token_ids(idx, self.config.vocab_size, self.config.block_size)
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.transformer.wte(idx) + self.transformer.wpe(pos)

    def run_blocks(self, x, start=0, stop=None):
        """Run blocks start..stop-1: x is the residual at index `start`, the result is the residual at `stop`."""
        stop = self.config.n_layer if stop is None else stop
        assert 0 <= start <= stop <= self.config.n_layer, f"bad block range {start}..{stop}"
        for block in self.transformer.h[start:stop]:
            x = block(x)
        return x

    def final_norm(self, x):
        """The residual after the last block -> what the unembedding reads."""
        return self.transformer.ln_f(x)

    # The unembedding as the losses read it, the same for every model: logits = final_norm(x) @ head_weight.T, plus
    # head_bias and a soft cap (cap * tanh(logits / cap)) where a model has them (hf_model.py); GPT-2 has neither.
    head_bias = None
    logit_softcap = None

    @property
    def head_weight(self):
        return self.lm_head.weight  # (vocab, n_embd), tied to wte

    def unembed(self, x):
        """The residual after the last block -> logits (B, T, vocab)."""
        return self.lm_head(self.final_norm(x))

    def forward(self, idx, edits=None):
        """Logits (B, T, vocab) for every position. `edits` maps position names to functions that replace the
        residual stream there: `{"blocks.6.hook_resid_pre": sae_reconstruction}`."""
        by_index = {}  # names for the same place (blocks.5.hook_resid_post, blocks.6.hook_resid_pre) apply in order
        for name, fn in (edits or {}).items():
            by_index.setdefault(self.resid_index(name), []).append(fn)
        x, at = self.embed(idx), 0
        for r in sorted(by_index):
            x, at = self.run_blocks(x, at, r), r
            for fn in by_index[r]:
                x = fn(x)
        return self.unembed(self.run_blocks(x, at))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, edits=None):
        """Append max_new_tokens sampled tokens to idx (B, T). temperature=0 is greedy decoding."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size:], edits=edits)[:, -1, :]
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, next_id), dim=1)
        return idx

    # ---- OpenAI's weights ----

    @classmethod
    def from_pretrained(cls, name_or_path):
        """Load GPT-2 weights in Hugging Face's layout (config.json + model.safetensors) from a local directory,
        or fetch OpenAI's release by name ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl') through the hub."""
        if os.path.isdir(name_or_path):
            config_path, weights_path = (os.path.join(name_or_path, f) for f in ("config.json", "model.safetensors"))
            for path in (config_path, weights_path):
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"{path} not found: a GPT-2 directory holds config.json and "
                                            "model.safetensors (as language_models.save_pretrained writes them)")
        elif name_or_path in HUB_REPOS:
            config_path, weights_path = _download(HUB_REPOS[name_or_path])
        else:
            raise ValueError(f"{name_or_path!r} is neither a directory nor one of {sorted(HUB_REPOS)}")

        with open(config_path) as f:
            hf = json.load(f)
        config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                           n_head=hf["n_head"], n_embd=hf["n_embd"], layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5))
        model = cls(config)
        model.load_state_dict(_read_hf_weights(weights_path, model), strict=True)
        model.name_or_path = os.path.abspath(name_or_path) if os.path.isdir(name_or_path) else name_or_path
        return model


HUB_REPOS = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}


def _download(repo_id):
    """Fetch config.json and model.safetensors, cached where the hub caches everything (HF_HOME)."""
    try:
        from huggingface_hub import hf_hub_download
        return hf_hub_download(repo_id, "config.json"), hf_hub_download(repo_id, "model.safetensors")
    except Exception as e:
        raise RuntimeError(f"could not fetch {repo_id} from the Hugging Face hub ({type(e).__name__}: {e}). "
                           "Offline, download it elsewhere and pass the directory holding config.json and "
                           "model.safetensors instead") from e


def _read_hf_weights(path, model):
    """Hugging Face GPT-2 tensors -> our state dict. HF stores Conv1D weights as (in, out); we use (out, in)."""
    from safetensors.torch import load_file
    ours = model.state_dict()
    sd = {}
    for key, t in load_file(path).items():
        key = key.removeprefix("transformer.")
        if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
            continue  # causal-mask buffers of old checkpoints; lm_head is tied to wte
        key = "transformer." + key
        if key not in ours:
            raise KeyError(f"{path}: unexpected tensor {key!r} for a GPT-2 model")
        if key.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            t = t.t()
        if t.shape != ours[key].shape:
            raise ValueError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(ours[key].shape)}")
        sd[key] = t
    sd["lm_head.weight"] = sd.get("transformer.wte.weight")
    missing = [k for k in ours if sd.get(k) is None]
    if missing:
        raise KeyError(f"{path}: missing tensors {missing}")
    return sd
