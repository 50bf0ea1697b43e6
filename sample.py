"""
Generate text from a model with and without the SAEs spliced in, side by side, from the same prompt and seed.

    python sample.py --checkpoint=out/saes.safetensors --prompt="To be, or not to be" --max_new_tokens=50
    python sample.py --checkpoint=saelens:neuronpedia/gpt2-small__res_sce-ajt/6-res_sce-ajt --temperature=0

A good SAE leaves the text about as fluent as the original model's; a poor one shows at once. The checkpoint is
any spec interop.py reads (this project's, the reference library's, SAELens's; local or remote).
"""

import os
import sys
from types import SimpleNamespace

import torch

import data
from configurator import ConfigError, check_settings, configure, default_device, defaults, device_rule, print_config
from e2esae import SAETransformer
from interop import check_specs
from language_models import load_model, tokenizer_of
from runs import nonfinite_parameters

# -----------------------------------------------------------------------------
checkpoint = "out/saes.safetensors"
init_from = ""  # '' = the model the checkpoint names | 'gpt2' (-medium, ...) | a directory
prompt = "The meaning of life is"
max_new_tokens = 50
temperature = 0.8  # 0 = greedy
top_k = 200  # 0 = no top-k filtering
seed = 1337
device = default_device()
# -----------------------------------------------------------------------------

DEFAULTS = defaults(globals())


SETTINGS = [  # (key, test, what the value must be): checked before anything is loaded
    ("max_new_tokens", lambda v: v > 0, "positive"),
    ("temperature", lambda v: v >= 0, ">= 0 (0 is greedy decoding)"),
    ("top_k", lambda v: v >= 0, ">= 0 (0: no top-k filtering)"),
    device_rule,
]


def main(argv):
    config = configure(DEFAULTS, argv)
    check_settings(config, SETTINGS)
    c = SimpleNamespace(**config)
    try:
        check_specs([c.checkpoint])  # names a missing or unknown checkpoint before any loading
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print_config(config)
    try:
        gpt = load_model(c.init_from) if c.init_from else None
        model = SAETransformer.from_checkpoint(c.checkpoint, gpt).to(c.device).eval()
    except (OSError, ValueError, RuntimeError) as e:  # interop's messages name the file and what is wrong
        raise ConfigError(f"checkpoint {c.checkpoint!r}: {e}") from None
    broken = nonfinite_parameters(model.saes)
    if broken:
        raise ConfigError(f"checkpoint {c.checkpoint!r}: its SAE weights are not finite ({', '.join(broken[:4])}): "
                          "the run diverged, so there is nothing to sample from; retrain it with a lower lr")
    tokenizer = tokenizer_of(model.gpt)
    enc = data.load_tokenizer(tokenizer)  # the model's own: GPT-2's (tiktoken) or a transformers tokenizer
    if tokenizer == "gpt2":
        ids = enc.encode(c.prompt, allowed_special={"<|endoftext|>"}) or [enc.eot_token]  # empty: a fresh document
    else:  # with the BOS in front where the model's tokenizer adds one
        ids = enc.encode(c.prompt) or [t for t in (enc.bos_token_id, enc.eos_token_id) if t is not None][:1]
    idx = torch.tensor([ids], device=c.device)  # (1, T)
    spliced = {p: (lambda x, s=model.sae(p): s(x)[0]) for p in model.sae_positions}
    name = os.path.basename(model.gpt.name_or_path.rstrip("/"))
    for title, edits in ((name, None), (f"{name} with SAEs at {', '.join(model.sae_positions)}", spliced)):
        torch.manual_seed(c.seed)  # the same seed for both: differences come from the SAEs, not the sampling
        out = model.gpt.generate(idx, c.max_new_tokens, temperature=c.temperature, top_k=c.top_k or None, edits=edits)
        print(f"\n--- {title} ---\n{enc.decode(out[0].tolist())}")


if __name__ == "__main__":
    main(sys.argv[1:])
