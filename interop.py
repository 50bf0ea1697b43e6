"""
SAEs in other tools' formats: SAELens, in which the paper's SAEs are published, and the reference library
`e2e_sae` (its run directories, locally or through wandb). e2esae.py's own checkpoints are SAETransformer.save /
SAETransformer.from_checkpoint; everything here converts to and from those classes.

    from interop import load_saelens, save_saelens, load_e2e_sae, load_wandb
    sae = load_saelens("neuronpedia/gpt2-small__res_sce-ajt", "6-res_sce-ajt")  # hub, or a local directory
    model = saelens_model(sae)                          # spliced into the GPT-2 its cfg.json names, at its hook
    save_saelens(model.sae("blocks.6.hook_resid_pre"), "my_sae", hook_name="blocks.6.hook_resid_pre")
    model = load_e2e_sae("path/to/e2e_sae/run")         # final_config.yaml + samples_{N}.pt (the newest N)
    model = load_wandb("sparsify/gpt2/tvj2owza")        # the same, downloaded from a wandb run

SAELens's format: a directory with cfg.json and sae_weights.safetensors holding W_enc (d_in, d_sae), b_enc,
W_dec (d_sae, d_in) and b_dec. Its standard SAE computes ReLU((x - b_dec if apply_b_dec_to_input) W_enc + b_enc)
W_dec + b_dec, with no decoder normalisation. The reference library's: final_config.yaml (its whole training
config) and samples_{N}.pt state dicts keyed like `blocks-6-hook_resid_pre.encoder.0.weight`.
"""

import json
import os

import torch

from e2esae import SAE, SAETransformer, load_gpt, sae_key

# e2e_sae and SAELens name models as TransformerLens does; these are the GPT-2s `GPT.from_pretrained` knows
TLENS_NAMES = {"gpt2-small": "gpt2", "gpt2": "gpt2", "gpt2-medium": "gpt2-medium", "gpt2-large": "gpt2-large",
               "gpt2-xl": "gpt2-xl"}


# ---- SAELens ----

def save_saelens(sae, path, hook_name, model_name="gpt2", context_size=1024, dataset_path="", prepend_bos=False):
    """Write a directory SAELens loads as a standard ReLU SAE (`sae_lens.SAE.load_from_disk(path)`).
    SAELens's SAE has no decoder normalisation, so W_dec holds our normalised dictionary: same outputs."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    tensors = {"W_enc": sae.encoder.weight.T, "b_enc": sae.encoder.bias,  # (d_in, n_dict), (n_dict,)
               "W_dec": sae.dict_elements.T, "b_dec": sae.decoder.bias}   # (n_dict, d_in), (d_in,)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()},
              os.path.join(path, "sae_weights.safetensors"))
    meta = dict(model_name=model_name, hook_name=hook_name, hook_layer=int(hook_name.split(".")[1]),
                hook_head_index=None, context_size=context_size, dataset_path=dataset_path, prepend_bos=prepend_bos)
    # SAELens 6 reads the metadata dict; older versions read the same fields at the top level
    cfg = dict(architecture="standard", d_in=sae.d_in, d_sae=sae.n_dict, dtype="float32", device="cpu",
               apply_b_dec_to_input=False, normalize_activations="none", reshape_activations="none",
               activation_fn="relu", activation_fn_str="relu", activation_fn_kwargs={},
               finetuning_scaling_factor=False, dataset_trust_remote_code=True, sae_lens_training_version=None,
               model_from_pretrained_kwargs={}, neuronpedia_id=None, **meta, metadata=meta)
    with open(os.path.join(path, "cfg.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def _saelens_files(path_or_repo, folder):
    """Local paths of cfg.json and sae_weights.safetensors: in a directory, or downloaded from a hub repo."""
    local = os.path.join(path_or_repo, folder or "")
    if os.path.isdir(local):
        return (os.path.join(local, n) for n in ("cfg.json", "sae_weights.safetensors"))
    if path_or_repo.count("/") != 1 or os.path.exists(path_or_repo):
        raise FileNotFoundError(f"{local} is not a directory (cfg.json + sae_weights.safetensors) and "
                                f"{path_or_repo!r} is not a Hugging Face repo id (owner/name)")
    prefix = f"{folder.strip('/')}/" if folder else ""
    try:
        from huggingface_hub import hf_hub_download
        return [hf_hub_download(path_or_repo, prefix + n) for n in ("cfg.json", "sae_weights.safetensors")]
    except Exception as e:
        raise RuntimeError(
            f"could not fetch {prefix}cfg.json and {prefix}sae_weights.safetensors from the Hugging Face repo "
            f"{path_or_repo} ({type(e).__name__}: {e}). Offline, download that folder elsewhere (`hf download "
            f"{path_or_repo} --include '{prefix}*'`), copy it here and load the local copy: "
            f"load_saelens('path/to/{folder or 'folder'}')") from e


def load_saelens(path_or_repo, folder=None):
    """Read a standard ReLU SAE in SAELens's format from a local directory, or from a Hugging Face repo and the
    folder in it (`load_saelens("neuronpedia/gpt2-small__res_sce-ajt", "6-res_sce-ajt")`). The result's
    `hook_name` says where it belongs; `saelens_cfg` is the whole cfg.json.

    Our decoder normalises its columns, SAELens's does not. ReLU is positively homogeneous, so a dictionary
    element of norm n is reproduced exactly by scaling its encoder row and bias by n and dividing it by n."""
    from safetensors.torch import load_file
    cfg_path, weights_path = _saelens_files(path_or_repo, folder)
    with open(cfg_path) as f:
        cfg = json.load(f)
    meta = cfg.get("metadata") or cfg.get("meta") or {}
    activation = cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu"
    normalize = cfg.get("normalize_activations") or "none"
    if cfg.get("architecture", "standard") != "standard" or activation != "relu" or normalize != "none":
        raise ValueError(f"{cfg_path}: only standard ReLU SAEs without activation normalisation can be imported, "
                         f"this one has architecture={cfg.get('architecture')!r}, activation_fn={activation!r}, "
                         f"normalize_activations={normalize!r}")
    w = {k: v.float() for k, v in load_file(weights_path).items()}
    W_enc, b_enc, W_dec, b_dec = w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"]  # (d_in, d_sae), (d_sae, d_in)
    if cfg.get("apply_b_dec_to_input", True):  # SAELens encodes x - b_dec: move that shift into the bias
        b_enc = b_enc - b_dec @ W_enc
    scale = w.get("finetuning_scaling_factor", w.get("scaling_factor"))
    if scale is not None:  # a per-feature factor on the code before decoding
        W_dec = W_dec * scale[:, None]
    norms = W_dec.norm(dim=1)  # (d_sae,)
    W_dec[norms == 0, 0] = 1.0  # an all-zero element never contributes: keep its code at 0, give it a unit vector
    sae = SAE(W_enc.shape[0], W_enc.shape[1])
    with torch.no_grad():
        sae.encoder.weight.copy_((W_enc * norms).T)  # (d_in, d_sae) * (d_sae,): column j scaled by its norm
        sae.encoder.bias.copy_(b_enc * norms)
        sae.decoder.weight.copy_((W_dec / W_dec.norm(dim=1, keepdim=True)).T)
        sae.decoder.bias.copy_(b_dec)
    sae.hook_name = cfg.get("hook_name") or cfg.get("hook_point") or meta.get("hook_name")
    sae.saelens_cfg = cfg
    return sae


def saelens_model(sae, gpt=None):
    """An SAETransformer with a SAELens SAE (from load_saelens) at its hook, in the GPT-2 its cfg.json names (or
    `gpt`). Its `config` is {}: SAELens files do not record the training loss."""
    if gpt is None:
        cfg = sae.saelens_cfg
        name = cfg.get("model_name") or (cfg.get("metadata") or {}).get("model_name")
        if name not in TLENS_NAMES:
            raise ValueError(f"the SAELens SAE was trained on model {name!r}: pass its GPT-2 as gpt= "
                             "(eval.py: --init_from=...)")
        gpt = load_gpt(TLENS_NAMES[name])
    model = SAETransformer(gpt, [sae.hook_name], dict_size_to_input_ratio=sae.n_dict / sae.d_in)
    model.saes[sae_key(sae.hook_name)] = sae.to(next(gpt.parameters()).device)
    model.config = {}
    return model


# ---- the reference library, e2e_sae ----

def load_e2e_sae(path, gpt=None):
    """Load an `e2e_sae` checkpoint: a directory with final_config.yaml and samples_{N}.pt files (the newest,
    largest N, is used), or one .pt file with final_config.yaml beside it. Without `gpt`, load the GPT-2 the
    config names. `model.config` holds the training coefficients under this project's names."""
    import yaml
    if os.path.isdir(path):
        numbers = {int(f[8:-3]): f for f in os.listdir(path)
                   if f.startswith("samples_") and f.endswith(".pt") and f[8:-3].isdigit()}
        if not numbers:
            raise FileNotFoundError(f"{path} holds no samples_{{N}}.pt checkpoint of the e2e_sae library")
        weights_path, config_path = os.path.join(path, numbers[max(numbers)]), os.path.join(path, "final_config.yaml")
    else:
        weights_path, config_path = path, os.path.join(os.path.dirname(path), "final_config.yaml")
    for p in (weights_path, config_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} not found: an e2e_sae checkpoint is final_config.yaml + samples_{{N}}.pt")
    with open(config_path) as f:
        ref = yaml.safe_load(f)
    init_from = TLENS_NAMES.get(ref.get("tlens_model_name"))
    if gpt is None:
        if init_from is None:
            raise ValueError(f"{config_path} names tlens_model_name={ref.get('tlens_model_name')!r}, not one of "
                             f"{sorted(TLENS_NAMES)}: pass the model as gpt=")
        gpt = load_gpt(init_from)
    # keys like blocks-6-hook_resid_pre.encoder.0.weight; ours have no nn.Sequential around the encoder
    state = {k.replace(".encoder.0.", ".encoder."): v
             for k, v in torch.load(weights_path, map_location="cpu", weights_only=True).items()}
    positions = sorted({k.split(".")[0].replace("-", ".") for k in state}, key=gpt.resid_index)
    filters = ref["saes"]["sae_positions"]
    filters = [filters] if isinstance(filters, str) else filters  # the reference matches them as substrings
    if any(not any(f in p for f in filters) for p in positions):
        raise ValueError(f"{weights_path} holds SAEs at {positions}, but {config_path} places them at {filters}")
    model = SAETransformer(gpt, positions, ref["saes"]["dict_size_to_input_ratio"])
    model.saes.load_state_dict(state)
    loss = {k: v or {} for k, v in (ref.get("loss") or {}).items()}  # a missing or null term has coefficient 0
    get = lambda term, key, default=0.0: float(loss.get(term, {}).get(key, default))
    downstream = loss.get("in_to_orig", {}).get("hook_positions") or []
    model.config = dict(
        init_from=init_from, sparsity_coeff=get("sparsity", "coeff"), p_norm=get("sparsity", "p_norm", 1.0),
        kl_coeff=get("logits_kl", "coeff"), out_to_in_coeff=get("out_to_in", "coeff"),
        out_to_orig_coeff=get("out_to_orig", "coeff"),
        in_to_orig_coeff=get("in_to_orig", "total_coeff", get("in_to_orig", "coeff")),  # total, split over positions
        in_to_orig_positions=[downstream] if isinstance(downstream, str) else list(downstream),
        reference_config=ref)
    return model.to(next(gpt.parameters()).device)


def load_wandb(run_path, gpt=None, cache_dir=None):
    """Download final_config.yaml and the newest samples_{N}.pt of a wandb run ("entity/project/run_id", e.g. the
    paper's "sparsify/gpt2/tvj2owza") to cache_dir (default ~/.cache/e2esae/<run_path>), then load_e2e_sae."""
    cache = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "e2esae", *run_path.split("/"))
    try:
        import wandb
        files = list(wandb.Api(timeout=30).run(run_path).files())
        config = next((f for f in files if os.path.basename(f.name) == "final_config.yaml"), None)
        samples = [f for f in files if os.path.basename(f.name).startswith("samples_") and f.name.endswith(".pt")]
        if config is None or not samples:
            raise FileNotFoundError(f"the run has no final_config.yaml or no samples_{{N}}.pt: {[f.name for f in files]}")
        newest = max(samples, key=lambda f: int(os.path.basename(f.name)[8:-3]))
        for f in (config, newest):
            with f.download(root=cache, replace=True) as local:
                os.replace(local.name, os.path.join(cache, os.path.basename(f.name)))  # flat: the two side by side
    except Exception as e:
        raise RuntimeError(
            f"could not download final_config.yaml and the newest samples_{{N}}.pt of the wandb run {run_path} "
            f"({type(e).__name__}: {e}). Tried wandb.Api().run({run_path!r}).files(), which needs a network and "
            "`wandb login`. Offline, download those two files elsewhere into one directory, copy it here and "
            "load it with load_e2e_sae('that/directory')") from e
    return load_e2e_sae(os.path.join(cache, os.path.basename(newest.name)), gpt)
