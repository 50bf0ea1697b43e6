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
"""

import json
import os

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
