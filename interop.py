"""
Every checkpoint format, in one place: this project's own, SAELens's (in which the paper's SAEs are published)
and the reference library `e2e_sae`'s (its run directories and the paper's SAEs on the Hugging Face hub,
locally or through wandb). Everything converts to and from e2esae.py's classes.

    from interop import load_checkpoint, load_saelens, save_saelens
    model = load_checkpoint("out")                                  # any spec below, as an SAETransformer
    sae = load_saelens("neuronpedia/gpt2-small__res_sce-ajt", "6-res_sce-ajt")  # hub, or a local directory
    model = saelens_model(sae)                          # spliced into the GPT-2 its cfg.json names, at its hook
    save_saelens(model.sae("blocks.6.hook_resid_pre"), "my_sae", hook_name="blocks.6.hook_resid_pre")

Importing this module also gives e2esae.py's classes the names the reference library (and this project's
earlier API) uses for them:

    SAETransformer.from_local_path(checkpoint_dir=None, checkpoint_file=None, config_file=None, gpt=None)
    SAETransformer.from_wandb("sparsify/gpt2/tvj2owza", gpt=None)
    SAE.from_saelens(path_or_repo, folder=None);   sae.save_saelens(path, hook_name)

A checkpoint spec (what eval.py, analysis.py, sample.py and train.py's pretrained_sae_paths take):

    out/saes.safetensors | out | out/ckpt.pt   this project's (train.py's out_dir; SAETransformer.from_checkpoint)
    path/to/dir | path/to/samples_N.pt         the reference library's run: final_config.yaml + samples_{N}.pt
    path/to/name.pt                            the reference library's SAE with its config in name.yaml beside it
                                               (the layout of the paper's SAEs on the hub)
    path/to/dir                                SAELens's: cfg.json + sae_weights.safetensors
    wandb:entity/project/run_id                the reference library's run on wandb, e.g. wandb:sparsify/gpt2/tvj2owza
    saelens:owner/repo/folder                  SAELens's on the Hugging Face hub (the paper's SAEs are published so)
    e2e_sae:owner/repo/name                    the reference library's on the hub: name.pt + name.yaml, e.g.
                                               e2e_sae:apollo-research/e2e-saes-gpt2/e2e_similar_ce_layer_6

SAELens's format: a directory with cfg.json and sae_weights.safetensors holding W_enc (d_in, d_sae), b_enc,
W_dec (d_sae, d_in) and b_dec (and `threshold` (d_sae,) for a JumpReLU). Its SAEs compute
activation((x - b_dec if apply_b_dec_to_input) W_enc + b_enc) W_dec + b_dec, with no decoder normalisation. The
reference library's: a training config (final_config.yaml or name.yaml) and state dicts keyed like
`blocks-6-hook_resid_pre.encoder.0.weight`.
"""

import json
import os

import torch

from e2esae import SAE, SAETransformer, checkpoint_metadata, sae_key
from model import GPT
from train_gpt import load_gpt

# e2e_sae and SAELens name models as TransformerLens does; these are the GPT-2s `GPT.from_pretrained` knows
TLENS_NAMES = {"gpt2-small": "gpt2", "gpt2": "gpt2", "gpt2-medium": "gpt2-medium", "gpt2-large": "gpt2-large",
               "gpt2-xl": "gpt2-xl"}


# ---- SAELens ----

# our activation -> SAELens's architecture (a trained BatchTopK is published as a JumpReLU with its threshold)
SAELENS_ARCHITECTURES = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}


def save_saelens(sae, path, hook_name, model_name="gpt2", context_size=1024, dataset_path="", prepend_bos=False):
    """Write a directory SAELens loads (`sae_lens.SAE.load_from_disk(path)`) as its own architecture: a ReLU SAE as
    'standard', TopK as 'topk', JumpReLU as 'jumprelu', and BatchTopK as SAELens publishes it for inference, a
    'jumprelu' whose every threshold is the one estimated in training. SAELens's SAEs have no decoder
    normalisation, so W_dec holds our normalised dictionary: the same outputs."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    name = sae.activation.name
    tensors = {"W_enc": sae.encoder.weight.T, "b_enc": sae.encoder.bias,  # (d_in, n_dict), (n_dict,)
               "W_dec": sae.dict_elements.T, "b_dec": sae.decoder.bias}   # (n_dict, d_in), (d_in,)
    if name in ("jumprelu", "batchtopk"):
        tensors["threshold"] = sae.activation.threshold.expand(sae.n_dict)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()},
              os.path.join(path, "sae_weights.safetensors"))
    meta = dict(model_name=model_name, hook_name=hook_name, hook_layer=int(hook_name.split(".")[1]),
                hook_head_index=None, context_size=context_size, dataset_path=dataset_path, prepend_bos=prepend_bos)
    # SAELens 6 reads the metadata dict; older versions read the same fields at the top level
    cfg = dict(architecture=SAELENS_ARCHITECTURES[name], d_in=sae.d_in, d_sae=sae.n_dict, dtype="float32",
               device="cpu", apply_b_dec_to_input=False, normalize_activations="none", reshape_activations="none",
               activation_fn="relu", activation_fn_str="relu", activation_fn_kwargs={},
               finetuning_scaling_factor=False, dataset_trust_remote_code=True, sae_lens_training_version=None,
               model_from_pretrained_kwargs={}, neuronpedia_id=None, **meta, metadata=meta)
    if name == "topk":
        cfg.update(k=sae.activation.k, rescale_acts_by_decoder_norm=False, activation_fn_kwargs={"k": sae.activation.k})
    with open(os.path.join(path, "cfg.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def _hub_files(repo, names, local_hint):
    """Download files of a Hugging Face repo; offline, say what was tried and how to load a local copy."""
    try:
        from huggingface_hub import hf_hub_download
        return [hf_hub_download(repo, n) for n in names]
    except Exception as e:
        raise RuntimeError(
            f"could not fetch {' and '.join(names)} from the Hugging Face repo {repo} ({type(e).__name__}: {e}). "
            f"Offline, download them elsewhere (`hf download {repo} {' '.join(names)} --local-dir .`), copy them "
            f"here and load the local copy: {local_hint}") from e


def _looks_local(path):
    """Whether a name is a local path rather than a hub repo (owner/name/...): it starts with '.', '/' or '~', or its
    first part is a folder here."""
    return path.startswith((".", "/", "~")) or os.path.isdir(path.split("/")[0])


def _saelens_files(path_or_repo, folder):
    """Local paths of cfg.json and sae_weights.safetensors: in a directory, or downloaded from a hub repo."""
    local = os.path.join(path_or_repo, folder) if folder else path_or_repo
    if os.path.isdir(local):
        return (os.path.join(local, n) for n in ("cfg.json", "sae_weights.safetensors"))
    top = path_or_repo.split("/")[0]
    if path_or_repo.count("/") != 1 or os.path.exists(path_or_repo) or _looks_local(path_or_repo):
        why = "is not a directory" if os.path.exists(local) else "does not exist"
        if os.path.isdir(top) and not os.path.exists(local):  # a typo under a folder that exists: say so, not the hub
            why += f" (read as a local path, since {top}/ exists here: check its spelling)"
        raise FileNotFoundError(f"no SAELens SAE at {local}: it {why}. SAELens's format is a directory holding "
                                "cfg.json and sae_weights.safetensors; a Hugging Face repo is given as owner/name")
    prefix = f"{folder.strip('/')}/" if folder else ""
    return _hub_files(path_or_repo, [prefix + n for n in ("cfg.json", "sae_weights.safetensors")],
                      f"load_saelens('path/to/{folder or 'folder'}')")


def load_saelens(path_or_repo, folder=None):
    """Read an SAE in SAELens's format ('standard' ReLU, 'topk' or 'jumprelu') from a local directory, or from a
    Hugging Face repo and the folder in it (`load_saelens("neuronpedia/gpt2-small__res_sce-ajt", "6-res_sce-ajt")`).
    The result's `hook_name` says where it belongs; `saelens_cfg` is the whole cfg.json.

    Our decoder normalises its columns, SAELens's does not. ReLU and JumpReLU are positively homogeneous, so a
    dictionary element of norm n is reproduced exactly by scaling its encoder row, bias (and threshold) by n and
    dividing it by n. A TopK selection is unchanged by that scaling only where SAELens selects on the rescaled
    pre-activations (rescale_acts_by_decoder_norm) or every element already has unit norm."""
    from safetensors.torch import load_file
    cfg_path, weights_path = _saelens_files(path_or_repo, folder)
    with open(cfg_path) as f:
        cfg = json.load(f)
    meta = cfg.get("metadata") or cfg.get("meta") or {}
    architecture = cfg.get("architecture", "standard")
    activation = cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu"
    normalize = cfg.get("normalize_activations") or "none"
    ours = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}.get(architecture)
    if ours is None or (architecture == "standard" and activation != "relu") or normalize != "none":
        raise ValueError(f"{cfg_path}: only SAELens's standard (ReLU), topk and jumprelu SAEs without activation "
                         f"normalisation can be imported, this one has architecture={architecture!r}, "
                         f"activation_fn={activation!r}, normalize_activations={normalize!r}")
    w = {k: v.float() for k, v in load_file(weights_path).items()}
    if ours == "jumprelu" and "threshold" not in w:
        raise ValueError(f"{weights_path}: a jumprelu SAE without its threshold tensor (it holds {sorted(w)})")
    W_enc, b_enc, W_dec, b_dec = w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"]  # (d_in, d_sae), (d_sae, d_in)
    if cfg.get("apply_b_dec_to_input", True):  # SAELens encodes x - b_dec: move that shift into the bias
        b_enc = b_enc - b_dec @ W_enc
    scale = w.get("finetuning_scaling_factor", w.get("scaling_factor"))
    if scale is not None:  # a per-feature factor on the code before decoding
        W_dec = W_dec * scale[:, None]
    norms = W_dec.norm(dim=1)  # (d_sae,)
    W_dec[norms == 0, 0] = 1.0  # an all-zero element never contributes: keep its code at 0, give it a unit vector
    unit = torch.allclose(norms, torch.ones_like(norms))
    if ours == "topk" and not cfg.get("rescale_acts_by_decoder_norm") and not unit:
        raise ValueError(f"{cfg_path}: a topk SAE whose decoder rows are not unit-norm and that selects on the raw "
                         "pre-activations (rescale_acts_by_decoder_norm false) has no exact equivalent here")
    sae = SAE(W_enc.shape[0], W_enc.shape[1], activation=ours, k=cfg.get("k", 100) if ours == "topk" else None)
    with torch.no_grad():
        sae.encoder.weight.copy_((W_enc * norms).T)  # (d_in, d_sae) * (d_sae,): column j scaled by its norm
        sae.encoder.bias.copy_(b_enc * norms)
        sae.decoder.weight.copy_((W_dec / W_dec.norm(dim=1, keepdim=True)).T)
        sae.decoder.bias.copy_(b_dec)
        if ours == "jumprelu":  # SAELens computes ReLU(pre) [pre > theta]: a negative theta acts as 0
            sae.activation.threshold.copy_(w["threshold"].clamp(min=0) * norms)
    sae.hook_name = cfg.get("hook_name") or cfg.get("hook_point") or meta.get("hook_name")
    if not sae.hook_name:
        raise ValueError(f"{cfg_path} names no position: neither hook_name (at the top or under metadata) nor "
                         "hook_point. Add \"hook_name\": \"blocks.6.hook_resid_pre\" (where it was trained) to it")
    sae.saelens_cfg = cfg
    return sae


def saelens_model(sae, gpt=None):
    """An SAETransformer with a SAELens SAE (from load_saelens) at its hook, in the GPT-2 its cfg.json names (or
    `gpt`). Its `config` holds only the dataset cfg.json names, if any: SAELens files do not record the loss."""
    if gpt is None:
        cfg = sae.saelens_cfg
        name = cfg.get("model_name") or (cfg.get("metadata") or {}).get("model_name")
        if name not in TLENS_NAMES:
            raise ValueError(f"the SAELens SAE was trained on model {name!r}: pass its GPT-2 as gpt= "
                             "(eval.py: --init_from=...)")
        gpt = GPT.from_pretrained(TLENS_NAMES[name])
    check_width(sae, gpt, "the SAELens SAE")
    model = SAETransformer(gpt, [sae.hook_name], dict_size_to_input_ratio=sae.n_dict / sae.d_in)
    model.saes[sae_key(sae.hook_name)] = sae.to(next(gpt.parameters()).device)
    cfg = sae.saelens_cfg
    model.config = _dataset_of(cfg.get("dataset_path") or (cfg.get("metadata") or {}).get("dataset_path"))
    return model


def _dataset_of(name):
    """{'dataset': name} where a foreign checkpoint records the data it was trained on, else {}."""
    return {"dataset": name} if name else {}


def check_width(sae, gpt, what):
    if sae.d_in != gpt.config.n_embd:
        raise ValueError(f"{what} reads activations of width {sae.d_in}, but the model is {gpt.config.n_embd} wide: "
                         "load the model it was trained on (eval.py: --init_from=...)")


# ---- the reference library, e2e_sae ----

def _read_e2e_sae(weights_path, config_path, gpt):
    """An SAETransformer from one e2e_sae state dict and its training config (the whole YAML)."""
    import yaml
    for p in (weights_path, config_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} not found: an e2e_sae checkpoint is a training config (final_config.yaml, "
                                    "or name.yaml beside name.pt) and a state dict (samples_{N}.pt or name.pt)")
    with open(config_path) as f:
        ref = yaml.safe_load(f)
    init_from = TLENS_NAMES.get(ref.get("tlens_model_name"))
    if gpt is None:
        if init_from is None:
            raise ValueError(f"{config_path} names tlens_model_name={ref.get('tlens_model_name')!r}, not one of "
                             f"{sorted(TLENS_NAMES)}: pass the model as gpt=")
        gpt = GPT.from_pretrained(init_from)
    # keys like blocks-6-hook_resid_pre.encoder.0.weight; ours have no nn.Sequential around the encoder
    state = {k.replace(".encoder.0.", ".encoder."): v
             for k, v in torch.load(weights_path, map_location="cpu", weights_only=True).items()}
    positions = sorted({k.split(".")[0].replace("-", ".") for k in state}, key=gpt.resid_index)
    filters = ref["saes"]["sae_positions"]
    filters = [filters] if isinstance(filters, str) else filters  # the reference matches them as substrings
    if any(not any(f in p for f in filters) for p in positions):
        raise ValueError(f"{weights_path} holds SAEs at {positions}, but {config_path} places them at {filters}")
    width = next(v.shape[1] for k, v in state.items() if k.endswith(".encoder.weight"))
    if width != gpt.config.n_embd:
        raise ValueError(f"{weights_path} holds SAEs of width {width}, but the model is {gpt.config.n_embd} wide: "
                         "load the model it was trained on (eval.py: --init_from=...)")
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
        reference_config=ref, **_dataset_of((ref.get("train_data") or {}).get("dataset_name")))
    return model.to(next(gpt.parameters()).device)


def newest_samples(directory):
    """The newest samples_{N}.pt of a reference library run directory (the largest N)."""
    numbers = {int(f[8:-3]): f for f in os.listdir(directory)
               if f.startswith("samples_") and f.endswith(".pt") and f[8:-3].isdigit()}
    if not numbers:
        raise FileNotFoundError(f"{directory} holds no samples_{{N}}.pt checkpoint of the e2e_sae library")
    return os.path.join(directory, numbers[max(numbers)])


def config_beside(weights_path):
    """The training config of a reference library state dict: name.yaml beside name.pt (the hub's layout), else
    the run's final_config.yaml."""
    named = os.path.splitext(weights_path)[0] + ".yaml"
    return named if os.path.isfile(named) else os.path.join(os.path.dirname(weights_path), "final_config.yaml")


def load_e2e_sae(path, gpt=None):
    """Load an `e2e_sae` checkpoint: a run directory (final_config.yaml and samples_{N}.pt files, the newest used),
    or one .pt file with its config beside it (name.yaml, or final_config.yaml). Without `gpt`, load the GPT-2 the
    config names. `model.config` holds the training coefficients under this project's names."""
    weights_path = newest_samples(path) if os.path.isdir(path) else path
    config_path = os.path.join(path, "final_config.yaml") if os.path.isdir(path) else config_beside(path)
    return _read_e2e_sae(weights_path, config_path, gpt)


def from_local_path(checkpoint_dir=None, checkpoint_file=None, config_file=None, gpt=None):
    """The reference library's SAETransformer.from_local_path: a checkpoint_dir with final_config.yaml and
    samples_{N}.pt files (the newest used), or one checkpoint_file with its config_file (e.g. the hub's
    e2e_similar_ce_layer_6.pt and e2e_similar_ce_layer_6.yaml). `gpt`: the model, else the one the config names."""
    if checkpoint_file is not None or config_file is not None:
        if checkpoint_file is None or config_file is None:
            raise ValueError("from_local_path takes checkpoint_file and config_file together (or checkpoint_dir "
                             f"alone), got checkpoint_file={checkpoint_file!r}, config_file={config_file!r}")
        return _read_e2e_sae(str(checkpoint_file), str(config_file), gpt)
    if checkpoint_dir is None:
        raise ValueError("from_local_path needs checkpoint_dir (a run directory) or checkpoint_file and config_file")
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"checkpoint_dir {checkpoint_dir} is not a directory")
    return _read_e2e_sae(newest_samples(str(checkpoint_dir)), os.path.join(checkpoint_dir, "final_config.yaml"), gpt)


def load_e2e_sae_hub(repo, name, gpt=None):
    """The reference library's SAE published on the hub as name.pt beside name.yaml (the paper's SAEs:
    `load_e2e_sae_hub("apollo-research/e2e-saes-gpt2", "e2e_similar_ce_layer_6")`)."""
    local = f"SAETransformer.from_local_path(checkpoint_file='{name}.pt', config_file='{name}.yaml')"
    weights, config = _hub_files(repo, [f"{name}.pt", f"{name}.yaml"], local)
    return _read_e2e_sae(weights, config, gpt)


def from_wandb(run_path, gpt=None, cache_dir=None):
    """The reference library's SAETransformer.from_wandb: download final_config.yaml and the newest samples_{N}.pt
    of a wandb run ("entity/project/run_id", e.g. the paper's "sparsify/gpt2/tvj2owza") to cache_dir (default
    ~/.cache/e2esae/<run_path>), then load them like from_local_path."""
    cache = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "e2esae", *run_path.split("/"))
    try:
        import wandb
        files = list(wandb.Api(timeout=30).run(run_path).files())
        config = next((f for f in files if os.path.basename(f.name) == "final_config.yaml"), None)
        samples = [f for f in files if os.path.basename(f.name).startswith("samples_") and f.name.endswith(".pt")]
        if config is None or not samples:
            names = [f.name for f in files]
            raise FileNotFoundError(f"the run has no final_config.yaml or no samples_{{N}}.pt: {names}")
        newest = max(samples, key=lambda f: int(os.path.basename(f.name)[8:-3]))
        for f in (config, newest):
            with f.download(root=cache, replace=True) as local:
                os.replace(local.name, os.path.join(cache, os.path.basename(f.name)))  # flat: the two side by side
    except Exception as e:
        raise RuntimeError(
            f"could not download final_config.yaml and the newest samples_{{N}}.pt of the wandb run {run_path} "
            f"({type(e).__name__}: {e}). Tried wandb.Api().run({run_path!r}).files(), which needs a network and "
            "`wandb login`. Offline, download those two files elsewhere into one directory, copy it here and "
            "load it with SAETransformer.from_local_path('that/directory')") from e
    return from_local_path(checkpoint_dir=cache, gpt=gpt)


load_wandb = from_wandb  # the name eval.py's wandb: specs and earlier versions of this module use

# the reference library's (and this project's earlier) names, on the classes themselves
SAETransformer.from_local_path = staticmethod(from_local_path)
SAETransformer.from_wandb = staticmethod(from_wandb)
SAE.from_saelens = staticmethod(load_saelens)
SAE.save_saelens = save_saelens


# ---- any checkpoint spec ----

def _lone_ckpt(path):
    return (f"checkpoint {path!r} is train.py's ckpt.pt without the saes.safetensors written beside it (the SAEs the "
            "scripts read): point at an out_dir that holds both; a run stopped part-way writes it again when it is "
            "resumed (train.py --resume=True)")


def checkpoint_kind(spec):
    """(kind, where) for a checkpoint spec (see the docstring), found without loading it, so that every spec is
    checked before any is evaluated. kind: 'ours' (where: the .safetensors), 'e2e_sae', 'saelens',
    'saelens-hub', 'e2e_sae-hub' or 'wandb'. Raises ValueError naming what was expected."""
    for prefix, kind in (("wandb:", "wandb"), ("saelens:", "saelens-hub"), ("e2e_sae:", "e2e_sae-hub")):
        if spec.startswith(prefix):
            where = spec[len(prefix):]
            if kind == "saelens-hub" and os.path.isdir(where):
                return "saelens", where
            if kind != "wandb" and _looks_local(where) and not os.path.exists(where):  # a typo, not a hub problem
                raise ValueError(f"checkpoint {spec!r}: {where} does not exist (a local path; a hub checkpoint is "
                                 f"written {prefix}owner/repo/folder)")
            if kind != "wandb" and where.count("/") < 2:
                raise ValueError(f"checkpoint {spec!r}: a {prefix} spec is {prefix}owner/repo/name")
            return kind, where
    inside = lambda name: os.path.join(spec, name)
    if os.path.isdir(spec):
        if os.path.isfile(inside("saes.safetensors")):  # train.py's out_dir
            return "ours", inside("saes.safetensors")
        if os.path.isfile(inside("final_config.yaml")):
            return "e2e_sae", spec
        if os.path.isfile(inside("cfg.json")):
            return "saelens", spec
        if os.path.isfile(inside("ckpt.pt")):
            raise ValueError(_lone_ckpt(inside("ckpt.pt")))
        raise ValueError(f"checkpoint {spec!r} is a directory without saes.safetensors (train.py), "
                         "final_config.yaml (e2e_sae) or cfg.json (SAELens)")
    if os.path.isfile(spec):
        if spec.endswith(".safetensors"):
            return "ours", spec
        if os.path.basename(spec) == "ckpt.pt":  # train.py's resumable checkpoint: its SAEs are written beside it
            beside = os.path.join(os.path.dirname(spec), "saes.safetensors")
            if os.path.isfile(beside):
                return "ours", beside
            raise ValueError(_lone_ckpt(spec))
        if spec.endswith(".pt") and os.path.isfile(config_beside(spec)):
            return "e2e_sae", spec
        if spec.endswith(".pt"):
            named = os.path.splitext(os.path.basename(spec))[0] + ".yaml"
            raise ValueError(f"checkpoint {spec!r} is a .pt file without its config: the reference library's state "
                             f"dicts need {named} or final_config.yaml beside them")
    if not os.path.exists(spec):
        raise ValueError(f"checkpoint {spec!r} does not exist (a local path; remote checkpoints are written "
                         "wandb:entity/project/run, saelens:owner/repo/folder or e2e_sae:owner/repo/name)")
    raise ValueError(f"checkpoint {spec!r} is none of: a .safetensors file or out_dir of train.py, a directory with "
                     "final_config.yaml (e2e_sae) or cfg.json (SAELens), a .pt file with its config, wandb:..., "
                     "saelens:..., e2e_sae:...")


def load_checkpoint(spec, init_from="", gpt=None):
    """An SAETransformer for any checkpoint spec. The model is `gpt`, else `init_from` (e.g. 'gpt2', a directory,
    'shakespeare'), else the one the checkpoint names (the embedded default's small model found in the cache, or
    trained first). `model.config` holds the training settings where the checkpoint records them, else {}."""
    kind, where = checkpoint_kind(spec)
    if gpt is None and init_from:
        gpt = load_gpt(init_from)
    if kind == "wandb":
        return from_wandb(where, gpt)
    if kind in ("saelens-hub", "e2e_sae-hub"):
        parts = where.split("/")
        repo, name = "/".join(parts[:2]), "/".join(parts[2:])
        if kind == "saelens-hub":
            return saelens_model(load_saelens(repo, name), gpt)
        return load_e2e_sae_hub(repo, name, gpt)
    if kind == "saelens":
        return saelens_model(load_saelens(where), gpt)
    if kind == "e2e_sae":
        return load_e2e_sae(where, gpt)
    if gpt is None:
        config = json.loads(checkpoint_metadata(where)["config"])
        if config.get("init_from") == "shakespeare":
            gpt = load_gpt("shakespeare", config.get("small_model_config", ""))
    return SAETransformer.from_checkpoint(where, gpt)
