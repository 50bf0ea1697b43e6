"""
Every language model an SAE can be spliced into, loaded by one function: load_model(init_from).

    gpt = load_model("gpt2")            # OpenAI's GPT-2 (-medium, -large, -xl), from the Hugging Face hub (model.py)
    gpt = load_model("gpt2-small")      # the name TransformerLens (and so the reference library's configs) gives it
    gpt = load_model("path/to/dir")     # a directory in the hub's layout: config.json + model.safetensors

What comes back is frozen (no gradients) and in eval mode, and has the seam e2esae.py splices into (model.py's
docstring): embed, run_blocks, final_norm, unembed, resid_index. The embedded default's small GPT-2 ('shakespeare'
in train.py) is a directory like any other: train_gpt.py trains it, caches it and says where.
"""

import json
import os

from model import GPT, HUB_REPOS

# TransformerLens's names for the models above (the reference library and SAELens write these)
ALIASES = {"gpt2-small": "gpt2"}


def load_model(init_from):
    """The frozen model `init_from` names: a GPT-2 name (or its TransformerLens alias), or a directory."""
    name = ALIASES.get(init_from, init_from)
    if os.path.isdir(name):
        config = os.path.join(name, "config.json")
        model_type = json.load(open(config)).get("model_type") if os.path.isfile(config) else "gpt2"
        if model_type != "gpt2":
            raise ValueError(f"{name} holds a {model_type!r} model; this loader reads GPT-2 directories "
                             "(config.json with model_type 'gpt2' + model.safetensors)")
    elif name not in HUB_REPOS:
        raise ValueError(f"init_from={init_from!r} is neither a directory nor one of {', '.join(sorted(HUB_REPOS))}")
    return GPT.from_pretrained(name).requires_grad_(False).eval()
