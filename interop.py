"""
Every checkpoint format, in one place: this project's own, SAELens's (in which the paper's SAEs are published) and
the reference library `e2e_sae`'s (its run directories and the paper's SAEs on the Hugging Face hub, locally or
through wandb). This module reads and writes files as tensors and plain settings; e2esae.py's classes inherit their
methods for files from the two classes at its end, SAEFiles and SAETransformerFiles. Files are shared, so reading
one never runs code: .pt files are unpickled as tensors and plain data only (torch.load with weights_only=True),
YAML with yaml.safe_load. A file that cannot be read as its format says (damaged, cut short, a tensor missing or of
the wrong shape, a config that is not a mapping, objects that unpickling would run) is one ValueError naming the
file and what is wrong.

    SAETransformer.from_checkpoint(spec)        # any spec below (read_checkpoint)
    SAETransformer.from_local_path(...)         # the reference library's names, as it documents them
    SAETransformer.from_wandb("sparsify/gpt2/tvj2owza")
    SAE.from_saelens(path_or_repo, folder);  sae.save_saelens(path, hook_name)   # = save_saelens(sae, ...)

A checkpoint spec (what eval.py, analysis.py, sample.py and train.py's pretrained_sae_paths take):

    out/saes.safetensors | out | out/ckpt.pt   this project's (train.py's out_dir)
    path/to/dir | path/to/samples_N.pt         the reference library's run: final_config.yaml + samples_{N}.pt
    path/to/name.pt                            the reference library's SAE with its config in name.yaml beside it
                                               (the layout of the paper's SAEs on the hub)
    path/to/dir                                SAELens's: cfg.json + sae_weights.safetensors
    wandb:entity/project/run_id                the reference library's run on wandb, e.g. wandb:sparsify/gpt2/tvj2owza
    saelens:owner/repo/folder                  SAELens's on the Hugging Face hub (the paper's SAEs are published so)
    e2e_sae:owner/repo/name                    the reference library's on the hub: name.pt + name.yaml, e.g.
                                               e2e_sae:apollo-research/e2e-saes-gpt2/e2e_similar_ce_layer_6

Whatever the format, reading gives a Checkpoint: the SAEs' positions, each SAE's shape, activation and tensors under
this project's names (encoder.weight (n_dict, d_in), encoder.bias, decoder.weight (d_in, n_dict), decoder.bias,
activation.threshold), the training settings under this project's names where the file records them, and the model
it was trained on (a name or directory that language_models.load_model takes).

This project's format: one safetensors file (train.py's saes.safetensors) holding every SAE's tensors, keyed
`blocks-6-hook_resid_pre.encoder.weight` (dots become hyphens, as in the reference library), with the positions,
the SAEs' settings, the model and the training config as JSON metadata. train.py's ckpt.pt holds the same tensors
and metadata (and the step, in both); it is the truth of its out_dir: where saes.safetensors is missing, damaged or
of another save (a run stopped between writing the two), the SAEs are read from ckpt.pt, and said so.
SAELens's: a directory with cfg.json and sae_weights.safetensors holding W_enc (d_in, d_sae), b_enc, W_dec
(d_sae, d_in) and b_dec (and `threshold` (d_sae,) for a JumpReLU). Its SAEs compute
activation((x - b_dec if apply_b_dec_to_input) W_enc + b_enc) W_dec + b_dec, with no decoder normalisation.
The reference library's: a training config (final_config.yaml or name.yaml) and state dicts keyed like
`blocks-6-hook_resid_pre.encoder.0.weight`.
"""

import json
import os
import sys
from dataclasses import dataclass, field

import torch

from language_models import load_model


@dataclass
class Checkpoint:
    """What any format holds, as plain data. saes: {position: {"d_in", "n_dict", "activation", ... (the SAE's
    settings), "state": {tensor name: tensor}}}; config: training settings under this project's names."""

    saes: dict
    dict_size_to_input_ratio: float
    model: str = ""  # what it was trained on, for language_models.load_model ('' when the file does not say)
    config: dict = field(default_factory=dict)
    hook_name: str = ""  # SAELens's: where its one SAE sits
    saelens_cfg: dict = field(default_factory=dict)
    bos_token_id: int | None = None  # a token whose positions the SAEs leave alone (ours: BOS, unless included)


def sae_key(position):
    """Module and tensor keys can't hold dots: blocks.6.hook_resid_pre -> blocks-6-hook_resid_pre (as the reference)."""
    return position.replace(".", "-")


# ---- reading files: tensors and plain data only, every failure named ----

def load_pt(path, mmap=False):
    """A .pt file's tensors and plain data (torch.load with weights_only=True, on the CPU; mmap: mapped, not read).
    A file that holds other objects is refused unopened: unpickling them would run whatever code they name."""
    import pickle
    import re
    import zipfile
    try:
        mmap = mmap and zipfile.is_zipfile(path)  # torch maps its zip format only (a file cut short is none)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        named = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if named is None:  # not a pickle that names code: bytes of something else, or cut short
            raise ValueError(f"{path} is damaged and cannot be read (UnpicklingError: {str(e).splitlines()[0]})") \
                from None
        what = f" (it names {named.group(1)})"
        raise ValueError(f"{path} holds Python objects other than tensors and plain data{what}: it was not loaded, "
                         "since unpickling them would run code. A checkpoint of this project or of e2e_sae holds "
                         "none: get the file again from where it was made") from None
    except OSError as e:
        if e.filename is not None:  # missing, or not readable: the error names the file
            raise
        raise ValueError(f"{path} is damaged and cannot be read ({e})") from None  # e.g. a zip cut short
    except Exception as e:  # a file cut short or overwritten: the zip reader's RuntimeError, a KeyError, ...
        message = str(e).split(". ")[0]
        raise ValueError(f"{path} is damaged and cannot be read ({type(e).__name__}: {message})") from None


def load_yaml(path):
    """A YAML file of settings (yaml.safe_load: plain values only), checked to be a mapping."""
    import yaml
    try:
        with open(path) as f:
            settings = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        if isinstance(e, yaml.constructor.ConstructorError):
            raise ValueError(f"{path} cannot be read as plain settings: {problem}{where}. A tag like !!python/object "
                             "builds Python objects, which can run code; a training config holds none") from None
        raise ValueError(f"{path} is not valid YAML: {problem}{where}") from None
    return _mapping(settings, path)


def load_json(path):
    """A JSON file of settings, checked to be a mapping."""
    try:
        with open(path) as f:
            return _mapping(json.load(f), path)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def _mapping(settings, path):
    if not isinstance(settings, dict):
        raise ValueError(f"{path} holds a {type(settings).__name__}, not a mapping of settings: it is damaged or "
                         "another file than a training config")
    return settings


def load_safetensors(path):
    """(tensors, metadata) of a safetensors file."""
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except OSError:
        raise
    except Exception as e:  # safetensors' own error: cut short, overwritten, not a safetensors file
        raise ValueError(f"{path} is damaged or not a safetensors file ({e})") from None


# the tensors of every SAE (as Checkpoint.saes holds them), their shapes in terms of d_in and n_dict
SAE_TENSORS = {"encoder.weight": ("n_dict", "d_in"), "encoder.bias": ("n_dict",),
               "decoder.weight": ("d_in", "n_dict"), "decoder.bias": ("d_in",)}
OPTIONAL = {"input_scale": ()}  # 1 where a file has none (saved SAEs hold it folded in: 1)
THRESHOLDS = {"jumprelu": ("n_dict",), "batchtopk": ()}  # activation.threshold: one per element, or one in all


def check_tensors(where, tensors, shapes, dims):
    """Every tensor `shapes` names is in `tensors`, of its shape (named dimensions, sized in `dims`)."""
    missing = [n for n in shapes if n not in tensors]
    if missing:
        raise ValueError(f"{where} has no {', '.join(missing)} (it holds {', '.join(sorted(tensors)) or 'nothing'}): "
                         "the file is incomplete or not of this format")
    for name, named in shapes.items():
        expected = tuple(dims[d] for d in named)
        if tuple(tensors[name].shape) != expected:
            raise ValueError(f"{where} has {name} of shape {tuple(tensors[name].shape)}, not {expected} ("
                             + ", ".join(f"{d}={n}" for d, n in dims.items()) + "): the file is damaged")


def sae_entry(path, position, state, **settings):
    """One SAE of a checkpoint read from `path` (Checkpoint.saes[position]): its shape as the file records it (else
    from the encoder), its settings, its tensors, each checked to be there and of its shape."""
    where = f"{path}: the SAE at {position}"
    weight = state.get("encoder.weight")
    if weight is None or weight.dim() != 2:
        raise ValueError(f"{where} has no encoder weight matrix (it holds {', '.join(sorted(state)) or 'nothing'}): "
                         "the file is incomplete or holds no SAE")
    spec = {"d_in": weight.shape[1], "n_dict": weight.shape[0], "activation": "relu", **settings}
    shapes = {**SAE_TENSORS, **({"activation.threshold": THRESHOLDS[spec["activation"]]}
                                if spec["activation"] in THRESHOLDS else {})}
    unknown = [n for n in state if n not in shapes and n not in OPTIONAL]
    if unknown:
        raise ValueError(f"{where} ({spec['activation']}) holds tensors it does not use: {', '.join(unknown)}: the "
                         "file is not of this format")
    dims = {"d_in": spec["d_in"], "n_dict": spec["n_dict"]}
    check_tensors(where, state, {**shapes, **{n: s for n, s in OPTIONAL.items() if n in state}}, dims)
    return {**spec, "state": state}


# ---- this project's own ----

def ours_contents(saes, dict_size_to_input_ratio, model, config, **record):
    """(tensors, metadata) of this project's file for SAEs as Checkpoint.saes holds them; `record`: more metadata
    (train.py records the step)."""
    tensors = {f"{sae_key(p)}.{name}": t.detach().contiguous().cpu()
               for p, sae in saes.items() for name, t in sae["state"].items()}
    specs = {p: {k: v for k, v in s.items() if k != "state"} for p, s in saes.items()}
    meta = {"sae_positions": json.dumps(list(saes)), "dict_size_to_input_ratio": json.dumps(dict_size_to_input_ratio),
            "saes": json.dumps(specs), "gpt": json.dumps(model), "config": json.dumps(config or {}),
            **{k: json.dumps(v) for k, v in record.items()}}
    return tensors, meta


def write_file(f, tensors, metadata):
    """Write this project's file to `f` (a path or a binary file) from ours_contents's (tensors, metadata)."""
    from safetensors.torch import save
    data = save(tensors, metadata=metadata)
    if isinstance(f, (str, os.PathLike)):
        with open(f, "wb") as out:
            out.write(data)
    else:
        f.write(data)


def read_metadata(path):
    """The metadata of this project's file, checked: this project's checkpoint, readable."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no SAE checkpoint at {path}")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise ValueError(f"{path} is not a safetensors file ({e}); train.py writes saes.safetensors") from None
    if "sae_positions" not in meta:
        raise ValueError(f"{path} is not an e2esae checkpoint (its metadata has no sae_positions)")
    return meta


def saes_file_problem(path, metadata):
    """What keeps `path` from being the saes.safetensors of a save whose ckpt.pt recorded `metadata` (missing,
    damaged, of another step or another save), or None where it is that file."""
    try:
        meta = read_metadata(path)
    except FileNotFoundError:
        return f"{path} is missing"
    except ValueError as e:
        return f"{path} is damaged ({e})"
    if meta == metadata:
        return None
    steps = [m.get("step", "?") for m in (meta, metadata)]
    if steps[0] != steps[1]:
        return f"{path} holds the SAEs of step {steps[0]}, and ckpt.pt beside it those of step {steps[1]}"
    return f"{path} is of another save than ckpt.pt beside it (of step {steps[1]} too)"


def _ours(path, tensors, meta):
    """A Checkpoint from the tensors and metadata of this project's file (or of a ckpt.pt that holds them). Files from
    before the SAE variants record no settings: ReLU SAEs. The embedded default's small model ('shakespeare') is the
    directory it was loaded from."""
    try:
        config, positions = json.loads(meta["config"]), json.loads(meta["sae_positions"])
        specs = json.loads(meta.get("saes", "{}")) or {p: {"activation": "relu"} for p in positions}
        ratio, recorded = json.loads(meta["dict_size_to_input_ratio"]), json.loads(meta.get("gpt", '""'))
        model = recorded if config.get("init_from", "shakespeare") == "shakespeare" else config["init_from"]
        specs = {p: dict(specs[p]) for p in positions}
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"{path}: its metadata is damaged ({type(e).__name__}: {e})") from None
    saes = {p: sae_entry(path, p, {k[len(sae_key(p)) + 1:]: v for k, v in tensors.items()
                                   if k.startswith(sae_key(p) + ".")}, **specs[p]) for p in positions}
    return Checkpoint(saes, ratio, model, config, bos_token_id=json.loads(meta.get("bos_token_id", "null")))


def _ours_file(path):
    read_metadata(path)  # a missing file, another format or another project's file, each named
    return _ours(path, *load_safetensors(path))


def read_ours(path):
    """A Checkpoint from this project's file. train.py's saes.safetensors with its ckpt.pt beside it: read_run."""
    if os.path.basename(path) == "saes.safetensors" and os.path.isfile(os.path.join(os.path.dirname(path), "ckpt.pt")):
        return read_run(os.path.dirname(path) or ".")
    return _ours_file(path)


def _lone_ckpt(path):
    return (f"checkpoint {path!r} is train.py's ckpt.pt without the saes.safetensors written beside it (the SAEs the "
            "scripts read), and from before ckpt.pt held them itself: point at an out_dir that holds both; a run "
            "stopped part-way writes it again when it is resumed (train.py --resume=True)")


def read_run(out_dir):
    """The SAEs of train.py's out_dir. ckpt.pt is the truth (it is renamed into place first): its saes.safetensors
    where that is the file of ckpt.pt's save, else the SAEs held in ckpt.pt, saying so. A ckpt.pt written before it
    held its SAEs' metadata needs its saes.safetensors."""
    ckpt_path, saes_path = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "saes.safetensors")
    ckpt = load_pt(ckpt_path, mmap=True)
    if not isinstance(ckpt, dict) or not all(isinstance(ckpt.get(k, {}), dict) for k in ("saes", "saes_metadata")):
        raise ValueError(f"{ckpt_path} is not a checkpoint of train.py: it holds no mapping of its SAEs")
    recorded = ckpt.get("saes_metadata")
    if recorded is None:
        if not os.path.isfile(saes_path):
            raise ValueError(_lone_ckpt(ckpt_path))
        return _ours_file(saes_path)
    problem = saes_file_problem(saes_path, recorded)
    if problem is None:
        return _ours_file(saes_path)
    print(f"note: {problem}: reading the SAEs of step {recorded.get('step', '?')} from {ckpt_path} instead (train.py "
          "--resume=True writes saes.safetensors again)", file=sys.stderr)
    return _ours(ckpt_path, ckpt["saes"], recorded)


# ---- SAELens ----

# our activation -> SAELens's architecture (a trained BatchTopK is published as a JumpReLU with its threshold)
SAELENS_ARCHITECTURES = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}


def save_saelens(sae, path, hook_name, model_name="gpt2", context_size=1024, dataset_path="", prepend_bos=False):
    """Write an SAE (e2esae.SAE) as a directory SAELens loads (`sae_lens.SAE.load_from_disk(path)`) as its own
    architecture: ReLU as 'standard', TopK as 'topk', JumpReLU as 'jumprelu', and BatchTopK as SAELens publishes it
    for inference, a 'jumprelu' whose every threshold is the one estimated in training. SAELens's SAEs have no
    decoder normalisation, so W_dec holds our normalised dictionary: the same outputs."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    name, state = sae.settings["activation"], sae.folded_state_dict()  # one that reads unscaled activations
    dictionary = state["decoder.weight"] / state["decoder.weight"].norm(dim=0, keepdim=True)  # (d_in, n_dict)
    tensors = {"W_enc": state["encoder.weight"].T, "b_enc": state["encoder.bias"],  # (d_in, n_dict), (n_dict,)
               "W_dec": dictionary.T, "b_dec": state["decoder.bias"]}                # (n_dict, d_in), (d_in,)
    if name in ("jumprelu", "batchtopk"):
        tensors["threshold"] = state["activation.threshold"].expand(sae.n_dict)
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
        k = sae.settings["k"]
        cfg.update(k=k, rescale_acts_by_decoder_norm=False, activation_fn_kwargs={"k": k})
    with open(os.path.join(path, "cfg.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def hub_files(repo, names, local_hint):
    """Download files of a Hugging Face repo; offline, say what was tried and how to load a local copy."""
    try:
        from huggingface_hub import hf_hub_download
        return [hf_hub_download(repo, n) for n in names]
    except Exception as e:
        raise RuntimeError(
            f"could not fetch {' and '.join(names)} from the Hugging Face repo {repo} ({type(e).__name__}: {e}). "
            f"Offline, download them elsewhere (`hf download {repo} {' '.join(names)} --local-dir .`), copy them "
            f"here and load the local copy: {local_hint}") from e


def looks_local(path):
    """Whether a name is a local path rather than a hub repo (owner/name/...): it starts with '.', '/' or '~', or its
    first part is a folder here."""
    return path.startswith((".", "/", "~")) or os.path.isdir(path.split("/")[0])


def saelens_files(path_or_repo, folder):
    """Local paths of cfg.json and sae_weights.safetensors: in a directory, or downloaded from a hub repo."""
    local = os.path.join(path_or_repo, folder) if folder else path_or_repo
    if os.path.isdir(local):
        return (os.path.join(local, n) for n in ("cfg.json", "sae_weights.safetensors"))
    top = path_or_repo.split("/")[0]
    if path_or_repo.count("/") != 1 or os.path.exists(path_or_repo) or looks_local(path_or_repo):
        why = "is not a directory" if os.path.exists(local) else "does not exist"
        if os.path.isdir(top) and not os.path.exists(local):  # a typo under a folder that exists: say so, not the hub
            why += f" (read as a local path, since {top}/ exists here: check its spelling)"
        raise FileNotFoundError(f"no SAELens SAE at {local}: it {why}. SAELens's format is a directory holding "
                                "cfg.json and sae_weights.safetensors; a Hugging Face repo is given as owner/name")
    prefix = f"{folder.strip('/')}/" if folder else ""
    return hub_files(path_or_repo, [prefix + n for n in ("cfg.json", "sae_weights.safetensors")],
                     f"SAE.from_saelens('path/to/{folder or 'folder'}')")


def read_saelens(path_or_repo, folder=None):
    """A Checkpoint of one SAELens SAE ('standard' ReLU, 'topk' or 'jumprelu'), from a local directory or a Hugging
    Face repo and the folder in it; its hook_name says where it belongs, saelens_cfg is the whole cfg.json.

    Our decoder normalises its columns, SAELens's does not. ReLU and JumpReLU are positively homogeneous, so a
    dictionary element of norm n is reproduced exactly by scaling its encoder row, bias (and threshold) by n and
    dividing it by n. A TopK selection is unchanged by that scaling only where SAELens selects on the rescaled
    pre-activations (rescale_acts_by_decoder_norm) or every element already has unit norm."""
    cfg_path, weights_path = saelens_files(path_or_repo, folder)
    cfg = load_json(cfg_path)
    meta = cfg.get("metadata") or cfg.get("meta") or {}
    architecture = cfg.get("architecture", "standard")
    activation = cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu"
    normalize = cfg.get("normalize_activations") or "none"
    ours = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}.get(architecture)
    if ours is None or (architecture == "standard" and activation != "relu") or normalize != "none":
        raise ValueError(f"{cfg_path}: only SAELens's standard (ReLU), topk and jumprelu SAEs without activation "
                         f"normalisation can be imported, this one has architecture={architecture!r}, "
                         f"activation_fn={activation!r}, normalize_activations={normalize!r}")
    w = {k: v.float() for k, v in load_safetensors(weights_path)[0].items()}
    if ours == "jumprelu" and "threshold" not in w:
        raise ValueError(f"{weights_path}: a jumprelu SAE without its threshold tensor (it holds {sorted(w)})")
    if "W_enc" not in w or w["W_enc"].dim() != 2:
        raise ValueError(f"{weights_path} has no encoder weight matrix W_enc (it holds {', '.join(sorted(w))}): the "
                         "file is incomplete or holds no SAE")
    shapes = {"W_enc": ("d_in", "d_sae"), "b_enc": ("d_sae",), "W_dec": ("d_sae", "d_in"), "b_dec": ("d_in",),
              **{k: ("d_sae",) for k in ("threshold", "finetuning_scaling_factor", "scaling_factor") if k in w}}
    check_tensors(f"{weights_path} ({architecture})", w, shapes, dict(zip(("d_in", "d_sae"), w["W_enc"].shape)))
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
    hook_name = cfg.get("hook_name") or cfg.get("hook_point") or meta.get("hook_name")
    if not hook_name:
        raise ValueError(f"{cfg_path} names no position: neither hook_name (at the top or under metadata) nor "
                         "hook_point. Add \"hook_name\": \"blocks.6.hook_resid_pre\" (where it was trained) to it")
    state = {"encoder.weight": (W_enc * norms).T,  # (d_in, d_sae) * (d_sae,): column j scaled by its norm
             "encoder.bias": b_enc * norms, "decoder.weight": (W_dec / W_dec.norm(dim=1, keepdim=True)).T,
             "decoder.bias": b_dec}
    settings = {"d_in": W_enc.shape[0], "n_dict": W_enc.shape[1], "activation": ours}
    if ours == "topk":
        settings["k"] = cfg.get("k", 100)
    if ours == "jumprelu":  # SAELens computes ReLU(pre) [pre > theta]: a negative theta acts as 0
        state["activation.threshold"] = w["threshold"].clamp(min=0) * norms
    dataset = cfg.get("dataset_path") or meta.get("dataset_path")
    model = cfg.get("model_name") or meta.get("model_name") or ""  # TransformerLens's name, as load_model takes it
    return Checkpoint({hook_name: sae_entry(weights_path, hook_name, state, **settings)},
                      W_enc.shape[1] / W_enc.shape[0], model, {"dataset": dataset} if dataset else {}, hook_name, cfg)


# ---- the reference library, e2e_sae ----

def read_e2e_sae(weights_path, config_path):
    """A Checkpoint from one e2e_sae state dict and its training config (the whole YAML, kept as
    config["reference_config"]). The loss coefficients are given this project's names."""
    for p in (weights_path, config_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} not found: an e2e_sae checkpoint is a training config (final_config.yaml, "
                                    "or name.yaml beside name.pt) and a state dict (samples_{N}.pt or name.pt)")
    ref = load_yaml(config_path)
    raw = load_pt(weights_path)
    if not isinstance(raw, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in raw.items()):
        raise ValueError(f"{weights_path} is not a state dict (names to tensors) but a {type(raw).__name__}: the "
                         "reference library saves its SAEs' state dict in samples_{N}.pt")
    # keys like blocks-6-hook_resid_pre.encoder.0.weight; ours have no nn.Sequential around the encoder
    state = {k.replace(".encoder.0.", ".encoder."): v for k, v in raw.items()}
    positions = sorted({k.split(".")[0].replace("-", ".") for k in state})
    try:
        filters = ref["saes"]["sae_positions"]
        filters = [filters] if isinstance(filters, str) else list(filters)  # the reference matches them as substrings
        ratio = float(ref["saes"]["dict_size_to_input_ratio"])
        loss = {k: v or {} for k, v in (ref.get("loss") or {}).items()}  # a missing or null term has coefficient 0
        get = lambda term, key, default=0.0: float(loss.get(term, {}).get(key, default))
        downstream = loss.get("in_to_orig", {}).get("hook_positions") or []
        name = ref.get("tlens_model_name") or ""  # TransformerLens's name ('gpt2-small'), as load_model takes it
        config = dict(
            init_from=name, sparsity_coeff=get("sparsity", "coeff"), p_norm=get("sparsity", "p_norm", 1.0),
            kl_coeff=get("logits_kl", "coeff"), out_to_in_coeff=get("out_to_in", "coeff"),
            out_to_orig_coeff=get("out_to_orig", "coeff"),
            in_to_orig_coeff=get("in_to_orig", "total_coeff", get("in_to_orig", "coeff")),  # total, over positions
            in_to_orig_positions=[downstream] if isinstance(downstream, str) else list(downstream),
            reference_config=ref)
        dataset = (ref.get("train_data") or {}).get("dataset_name")
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"{config_path} is not a training config of e2e_sae as expected ({type(e).__name__}: {e}): "
                         "it needs saes.sae_positions and saes.dict_size_to_input_ratio, and numbers for the loss "
                         "coefficients") from None
    if any(not any(f in p for f in filters) for p in positions):
        raise ValueError(f"{weights_path} holds SAEs at {positions}, but {config_path} places them at {filters}")
    saes = {p: sae_entry(weights_path, p, {k[len(sae_key(p)) + 1:]: v for k, v in state.items()
                                           if k.startswith(sae_key(p) + ".")}) for p in positions}
    if dataset:
        config["dataset"] = dataset
    return Checkpoint(saes, ratio, name, config)


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


def e2e_sae_files(checkpoint_dir=None, checkpoint_file=None, config_file=None):
    """(state dict, config) as the reference library's from_local_path takes them: a checkpoint_dir with
    final_config.yaml and samples_{N}.pt files (the newest), or one checkpoint_file with its config_file."""
    if checkpoint_file is not None or config_file is not None:
        if checkpoint_file is None or config_file is None:
            raise ValueError("from_local_path takes checkpoint_file and config_file together (or checkpoint_dir "
                             f"alone), got checkpoint_file={checkpoint_file!r}, config_file={config_file!r}")
        return str(checkpoint_file), str(config_file)
    if checkpoint_dir is None:
        raise ValueError("from_local_path needs checkpoint_dir (a run directory) or checkpoint_file and config_file")
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"checkpoint_dir {checkpoint_dir} is not a directory")
    return newest_samples(str(checkpoint_dir)), os.path.join(checkpoint_dir, "final_config.yaml")


def download_wandb_run(run_path, cache_dir=None):
    """Download final_config.yaml and the newest samples_{N}.pt of a reference library run on wandb
    ("entity/project/run_id", e.g. the paper's "sparsify/gpt2/tvj2owza") into cache_dir (default
    ~/.cache/e2esae/<run_path>), side by side; return that directory."""
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
    return cache


# ---- any checkpoint spec ----

def checkpoint_kind(spec):
    """(kind, where) for a checkpoint spec (see the docstring), found without loading it, so that every spec is
    checked before any is evaluated. kind: 'ours' (where: the .safetensors), 'e2e_sae', 'saelens',
    'saelens-hub', 'e2e_sae-hub' or 'wandb'. Raises ValueError naming what was expected."""
    for prefix, kind in (("wandb:", "wandb"), ("saelens:", "saelens-hub"), ("e2e_sae:", "e2e_sae-hub")):
        if spec.startswith(prefix):
            where = spec[len(prefix):]
            if kind == "saelens-hub" and os.path.isdir(where):
                return "saelens", where
            if kind != "wandb" and looks_local(where) and not os.path.exists(where):  # a typo, not a hub problem
                raise ValueError(f"checkpoint {spec!r}: {where} does not exist (a local path; a hub checkpoint is "
                                 f"written {prefix}owner/repo/folder)")
            if kind != "wandb" and where.count("/") < 2:
                raise ValueError(f"checkpoint {spec!r}: a {prefix} spec is {prefix}owner/repo/name")
            return kind, where
    inside = lambda name: os.path.join(spec, name)
    if os.path.isdir(spec):
        if os.path.isfile(inside("saes.safetensors")) or os.path.isfile(inside("ckpt.pt")):  # train.py's out_dir
            return "ours", inside("saes.safetensors")  # (read_run reads ckpt.pt where that file is not its save's)
        if os.path.isfile(inside("final_config.yaml")):
            return "e2e_sae", spec
        if os.path.isfile(inside("cfg.json")):
            return "saelens", spec
        raise ValueError(f"checkpoint {spec!r} is a directory without saes.safetensors (train.py), "
                         "final_config.yaml (e2e_sae) or cfg.json (SAELens)")
    if os.path.isfile(spec):
        if spec.endswith(".safetensors"):
            return "ours", spec
        if os.path.basename(spec) == "ckpt.pt":  # train.py's resumable checkpoint: its out_dir
            return "ours", os.path.join(os.path.dirname(spec), "saes.safetensors")
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


def check_specs(specs):
    """checkpoint_kind of every spec, before any is loaded: a ValueError names the first that is wrong."""
    for spec in specs:
        checkpoint_kind(spec)


def read_checkpoint(spec):
    """The Checkpoint of any spec (see the docstring)."""
    kind, where = checkpoint_kind(spec)
    if kind == "ours":
        return read_ours(where)
    if kind == "saelens":
        return read_saelens(where)
    if kind == "e2e_sae":
        if os.path.isdir(where):
            return read_e2e_sae(*e2e_sae_files(checkpoint_dir=where))
        return read_e2e_sae(where, config_beside(where))
    if kind == "wandb":
        return read_e2e_sae(*e2e_sae_files(checkpoint_dir=download_wandb_run(where)))
    parts = where.split("/")
    repo, name = "/".join(parts[:2]), "/".join(parts[2:])
    if kind == "saelens-hub":
        return read_saelens(repo, name)
    local = f"SAETransformer.from_local_path(checkpoint_file='{name}.pt', config_file='{name}.yaml')"
    return read_e2e_sae(*hub_files(repo, [f"{name}.pt", f"{name}.yaml"], local))


# ---- the classes' methods for files: e2esae.SAE and SAETransformer inherit them ----

class SAEFiles:
    """e2esae.SAE's: built from a checkpoint's entry, read from and written as SAELens's format."""

    def _load_from_state_dict(self, state, prefix, *args):
        state.setdefault(prefix + "input_scale", torch.ones(()))  # files from before input normalisation: 1
        super()._load_from_state_dict(state, prefix, *args)

    @classmethod
    def from_spec(cls, spec):
        """An SAE from a checkpoint's entry (Checkpoint.saes[position]): its shape, settings and tensors."""
        settings = {k: v for k, v in spec.items() if k not in ("d_in", "n_dict", "state")}
        sae = cls(spec["d_in"], spec["n_dict"], **settings)
        sae.load_state_dict(spec["state"])
        return sae

    @classmethod
    def from_saelens(cls, path_or_repo, folder=None):
        """A SAELens SAE from a directory or a hub repo and its folder: `hook_name` says where it belongs."""
        checkpoint = read_saelens(path_or_repo, folder)
        sae = cls.from_spec(checkpoint.saes[checkpoint.hook_name])
        sae.hook_name, sae.saelens_cfg = checkpoint.hook_name, checkpoint.saelens_cfg
        return sae

    def save_saelens(self, path, hook_name, **cfg):
        """Write this SAE as a directory SAELens loads (save_saelens above has the details)."""
        save_saelens(self, path, hook_name, **cfg)


class SAETransformerFiles:
    """e2esae.SAETransformer's: its SAEs written in this project's format or SAELens's, and read from any spec."""

    def contents(self, config=None, **record):
        """(tensors, metadata) of save's file, with more metadata in `record` (train.py's ckpt.pt holds them)."""
        saes = {p: dict(d_in=self.sae(p).d_in, n_dict=self.sae(p).n_dict, **self.sae(p).settings,
                        state=self.sae(p).folded_state_dict()) for p in self.sae_positions}
        return ours_contents(saes, self.dict_size_to_input_ratio, getattr(self.gpt, "name_or_path", ""), config,
                             bos_token_id=self.bos_token_id, **record)

    def save(self, f, config=None):
        """Write the SAEs to `f` (a path or a binary file) in this project's format, with the training config."""
        write_file(f, *self.contents(config))

    def save_saelens(self, directory):
        """Write every SAE as a SAELens directory, directory/<position>, naming the model (its hub id, GPT-2 name or
        directory), the hook, the context and the data it was trained on, and whether samples start with BOS."""
        for p in self.sae_positions:
            save_saelens(self.sae(p), os.path.join(directory, p), p, model_name=self.gpt.name_or_path,
                         context_size=self.config.get("n_ctx", self.gpt.config.block_size),
                         dataset_path=self.config.get("dataset", ""), prepend_bos=self.bos_token_id is not None)

    @classmethod
    def from_checkpoint(cls, spec, gpt=None):
        """The SAEs of any checkpoint spec (the module docstring lists them), spliced into `gpt`, else into the model
        the checkpoint names. `config` holds its training settings."""
        return cls.from_contents(read_checkpoint(spec), gpt)

    @classmethod
    def from_local_path(cls, checkpoint_dir=None, checkpoint_file=None, config_file=None, gpt=None):
        """The reference library's loader: a run directory (final_config.yaml and samples_{N}.pt, the newest), or
        one checkpoint_file with its config_file (the hub's e2e_similar_ce_layer_6.pt and .yaml)."""
        return cls.from_contents(read_e2e_sae(*e2e_sae_files(checkpoint_dir, checkpoint_file, config_file)), gpt)

    @classmethod
    def from_wandb(cls, run_path, gpt=None, cache_dir=None):
        """The reference library's loader for a wandb run, "entity/project/run_id" (the paper's:
        "sparsify/gpt2/tvj2owza"): its files are downloaded to cache_dir, then read as from_local_path does."""
        return cls.from_local_path(checkpoint_dir=download_wandb_run(run_path, cache_dir), gpt=gpt)

    @classmethod
    def from_contents(cls, checkpoint, gpt=None):
        """The SAEs of a Checkpoint spliced into `gpt`, else into the model it names (language_models.load_model)."""
        if gpt is None:
            if not checkpoint.model:
                raise ValueError("the checkpoint does not say which model it was trained on: pass it as gpt= "
                                 "(eval.py: --init_from=...)")
            try:
                gpt = load_model(checkpoint.model)
            except (OSError, ValueError, RuntimeError) as e:
                raise ValueError(f"the model the checkpoint was trained on, {checkpoint.model!r}, could not be "
                                 f"loaded ({e}): pass the model as gpt= (eval.py: --init_from=...)") from e
        saes = {p: cls.sae_type.from_spec(spec) for p, spec in checkpoint.saes.items()}
        model = cls(gpt, list(saes), checkpoint.dict_size_to_input_ratio, saes=saes)
        model.config, model.bos_token_id = checkpoint.config, checkpoint.bos_token_id
        return model.to(next(gpt.parameters()).device)
