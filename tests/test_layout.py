"""The repository's own import names never shadow an installed package.

Python puts the directory of the script it runs (or the current directory, for `python -c` and notebooks) first on
sys.path. A top-level module or package of this repository that shares its import name with an installed
distribution's therefore replaces that package for every library that imports it, from any script run at the root.
It happened once: the kernels package was called `kernels`, the name of Hugging Face's `kernels`, which transformers
imports when a model class is first used, and every test that built a reference model with transformers failed.
"""
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys

from conftest import ROOT


def repository_import_names():
    """What `import name` finds at the root: modules (name.py) and regular packages (name/__init__.py). A folder
    without __init__.py (config/, tests/) is at most a namespace package, which an installed package of the same
    name takes precedence over."""
    names = set()
    for entry in os.listdir(ROOT):
        path = os.path.join(ROOT, entry)
        if entry.endswith(".py") and os.path.isfile(path):
            names.add(entry[:-3])
        elif os.path.isfile(os.path.join(path, "__init__.py")):
            names.add(entry)
    return names


def installed_import_names(tmp_path):
    """{import name: [distributions]} of everything installed, computed in a fresh interpreter that runs from a
    folder outside the repository (so the repository is not on its sys.path)."""
    code = "import importlib.metadata, json; print(json.dumps(importlib.metadata.packages_distributions()))"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def test_no_top_level_name_is_an_installed_distributions_import_name(tmp_path):
    installed = installed_import_names(tmp_path)
    assert installed, "packages_distributions() found nothing: the check would pass vacuously"
    assert "torch" in installed and "transformers" in installed  # the ones this repository uses, seen
    clashes = {name: installed[name] for name in repository_import_names() if name in installed}
    assert not clashes, (f"top-level names of the repository shadow installed packages when a script runs from the "
                         f"root: {clashes}. Rename them")


def test_the_kernels_package_has_a_name_of_its_own():
    assert "sae_kernels" in repository_import_names()
    assert importlib.util.find_spec("sae_kernels").origin == os.path.join(ROOT, "sae_kernels", "__init__.py")


def test_transformers_models_build_and_run_from_the_repository_root():
    """transformers' GPT-2 (the reference the tests compare against) and Llama (which needs Hugging Face's
    `kernels` package) build and run in an interpreter whose sys.path starts at the repository's root."""
    code = """
import torch, transformers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)).eval()
llama = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                     num_key_value_heads=1, vocab_size=64)).eval()
idx = torch.randint(0, 64, (1, 5))
with torch.no_grad():
    print(tuple(gpt2(idx).logits.shape), tuple(llama(idx).logits.shape))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["(1,", "5,", "64)", "(1,", "5,", "64)"]
