"""
A Hugging Face causal language model behind the seam model.GPT has, so SAEs splice into Pythia, Llama, Gemma, ...

model.py's GPT exposes its residual stream through three methods (embed, run_blocks, unembed) and TransformerLens'
position names; e2esae.py needs nothing else. HFModel gives any decoder-only model of the `transformers` library
the same seam, running the library's own modules, so its numbers are the library's numbers:

    blocks.{L}.hook_resid_pre   the stream entering decoder layer L      (residual index L)
    blocks.{L}.hook_resid_post  the stream leaving decoder layer L       (residual index L + 1)
                                for the last layer: before the final norm

    x = model.embed(idx)                  # residual index 0: whatever the family does before its first layer
                                          # (Gemma: x sqrt(d_model); GPT-2: + position embeddings; Granite: x m)
    x = model.run_blocks(x, start, stop)  # residual index start -> stop, any sub-range, exactly the full forward's
    logits = model.unembed(x)             # softcap(final_norm(x) @ head_weight.T + head_bias)

Everything inside a decoder layer (rotary position embeddings, grouped-query attention, Pythia's parallel residual,
Gemma's extra norms and attention soft-capping, Qwen3's q/k norms) stays in the library's layer. What a layer is
handed from outside, its causal mask and its rotary cos/sin, is built here by the functions the library's own
model forward calls, from the sequence length alone: no padding and no KV cache, positions 0 .. T-1.

Supported: what AutoModelForCausalLM loads as a decoder-only model whose base model keeps its decoder layers in one
list, `model.layers` (Llama 3, SmolLM2, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 text, OLMo 2, Phi-3, Granite,
GPT-NeoX/Pythia) or `transformer.h` (GPT-2), followed by a final norm. The frozen model is loaded by the library
itself, from a directory in the hub's layout (config.json and weights) or a hub id. `transformers` is imported
only when a model is loaded, so this file imports without it.

Usage:
    model = HFModel.from_pretrained("EleutherAI/pythia-70m-deduped")     # or a local directory
    logits = model(idx, edits={"blocks.3.hook_resid_post": lambda x: sae(x)[0]})   # as with model.GPT
"""

import inspect
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import GPT, check_token_ids

FINAL_NORM_NAMES = ("norm", "final_layer_norm", "ln_f")  # Llama and most others; GPT-NeoX; GPT-2
SUPPORTED = ("a decoder-only causal LM (AutoModelForCausalLM) whose base model holds its decoder layers in one list "
             "(model.layers: Llama, Mistral, Qwen2/3, Gemma 2/3 text, OLMo 2, Phi-3, Granite, GPT-NeoX; "
             "transformer.h: GPT-2) and ends in a final norm")


@dataclass
class HFModelConfig:
    n_layer: int
    n_embd: int
    vocab_size: int  # rows of the unembedding
    block_size: int  # longest context (max_position_embeddings)
    model_type: str  # the hub's name for the family: "llama", "gemma2", "gpt_neox", ...
    bos_token_id: int | None


class _FirstLayerReached(Exception):
    """Carries the stream entering decoder layer 0 out of the model's forward, which it stops there."""

    def __init__(self, stream):
        super().__init__()
        self.stream = stream


class HFModel(nn.Module):
    """A frozen transformers causal LM with model.GPT's seam. Build it with HFModel.from_pretrained."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf.requires_grad_(False).eval()
        c, base = hf.config, hf.base_model
        n_layer = c.num_hidden_layers
        # found by shape, not by family: the one list of n_layer modules, and the norm after it
        lists = [name for name, m in base.named_children() if isinstance(m, nn.ModuleList) and len(m) == n_layer]
        norms = [name for name in FINAL_NORM_NAMES if isinstance(getattr(base, name, None), nn.Module)]
        head = hf.get_output_embeddings()
        if len(lists) != 1 or not norms or not isinstance(head, nn.Linear):
            raise ValueError(f"{type(hf).__name__} ({c.model_type}): found {len(lists)} lists of {n_layer} decoder "
                             f"layers, final norm {norms or 'none'}, head {type(head).__name__}; "
                             f"supported: {SUPPORTED}")
        self._layers_name, self._norm_name = lists[0], norms[0]
        # Each layer attends with its own kind of mask: Gemma 2/3 and Qwen2 list them per layer; Mistral and Phi-3
        # slide every layer's window when the config has one (their model forward's rule); the others are causal
        default = "sliding_attention" if getattr(c, "sliding_window", None) is not None else "full_attention"
        self.layer_types = list(getattr(c, "layer_types", None) or [default] * n_layer)
        # Gemma 3 keeps one rotary table per layer kind (local layers use their own base frequency)
        self.rotary_per_type = (self.rotary is not None
                                and "layer_type" in inspect.signature(self.rotary.forward).parameters)
        self.config = HFModelConfig(n_layer=n_layer, n_embd=c.hidden_size, vocab_size=head.weight.shape[0],
                                    block_size=getattr(c, "max_position_embeddings", None) or 2**31,
                                    model_type=c.model_type, bos_token_id=getattr(c, "bos_token_id", None))
        # Gemma 2: logits = cap tanh(logits / cap). Granite divides its logits by logits_scaling (see final_norm).
        self.logit_softcap = getattr(c, "final_logit_softcapping", None)
        self.logits_scaling = getattr(c, "logits_scaling", None)
        self.name_or_path = getattr(c, "_name_or_path", "")
        self.eval()

    # the library's modules, reached through self.hf so that each is registered once

    @property
    def layers(self):
        return getattr(self.hf.base_model, self._layers_name)

    @property
    def rotary(self):
        return getattr(self.hf.base_model, "rotary_emb", None)  # None where positions are learned (GPT-2)

    @property
    def head_weight(self):
        """The unembedding, (vocab, d): tied to the input embedding or not, as the model has it."""
        return self.hf.get_output_embeddings().weight

    @property
    def head_bias(self):
        return self.hf.get_output_embeddings().bias  # (vocab,) or None

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    # ---- the residual stream by name, the edits and sampling: GPT's own code, which reads only the seam ----

    positions = GPT.positions
    resid_index = GPT.resid_index
    forward = GPT.forward
    generate = GPT.generate

    # ---- the seam ----

    def embed(self, idx):
        """Token ids (B, T) -> the stream entering decoder layer 0, (B, T, d): by definition what the model's own
        forward hands that layer, so every family's prelude (scaled or summed embeddings, multipliers) is included
        without a line of it here. A hook on layer 0 takes the stream and stops the forward before any layer runs."""
        check_token_ids(idx, self.config.vocab_size, self.config.block_size)

        def stop(module, args, kwargs):
            raise _FirstLayerReached(args[0] if args else kwargs["hidden_states"])

        hook = self.layers[0].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.hf.base_model(input_ids=idx, use_cache=False)
        except _FirstLayerReached as reached:
            return reached.stream
        finally:
            hook.remove()
        raise RuntimeError(f"{type(self.hf).__name__}'s forward never reached its first decoder layer")

    def _layer_inputs(self, x, kinds):
        """What the model's forward gives each kind of layer besides the stream, for a stream x (B, T, d) at
        positions 0 .. T-1: the attention mask (causal, or causal within a sliding window) and the rotary cos/sin.
        Built by the same library functions the model's forward calls; with the default attention they are often
        None (plain causal attention), and a tensor (B, 1, T, T) where a window or eager attention needs one."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        position_ids = torch.arange(x.shape[1], device=x.device).unsqueeze(0)  # (1, T)
        make_mask = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
        inputs = {}
        for kind in kinds:
            if kind not in make_mask:
                raise ValueError(f"layer type {kind!r} of {self.config.model_type} is not supported: {SUPPORTED}")
            # (config, inputs_embeds, attention_mask: no padding, cache: none); x gives batch, length, dtype, device
            kw = dict(attention_mask=make_mask[kind](self.hf.config, x, None, None, position_ids=position_ids),
                      position_ids=position_ids)
            if self.rotary is not None:
                kw["position_embeddings"] = (self.rotary(x, position_ids, kind) if self.rotary_per_type
                                             else self.rotary(x, position_ids))  # (cos, sin), each (1, T, head_dim)
            inputs[kind] = kw
        return inputs

    def run_blocks(self, x, start=0, stop=None):
        """Run decoder layers start..stop-1: x is the residual at index `start`, the result the residual at `stop`."""
        stop = self.config.n_layer if stop is None else stop
        assert 0 <= start <= stop <= self.config.n_layer, f"bad block range {start}..{stop}"
        kinds = self.layer_types[start:stop]
        inputs = self._layer_inputs(x, sorted(set(kinds)))
        for layer, kind in zip(self.layers[start:stop], kinds):
            out = layer(x, **inputs[kind])
            x = out[0] if isinstance(out, tuple) else out  # transformers 4's layers return (hidden_states, ...)
        return x

    def final_norm(self, x):
        """The stream after the last layer -> what the head reads. Granite's logits are (h @ W.T) / s; the head has
        no bias, so dividing h by s instead gives the same logits and keeps head_weight the model's own tensor."""
        x = getattr(self.hf.base_model, self._norm_name)(x)
        return x / self.logits_scaling if self.logits_scaling is not None else x

    def unembed(self, x):
        """The residual after the last layer -> logits (B, T, vocab)."""
        logits = F.linear(self.final_norm(x), self.head_weight, self.head_bias)  # (B, T, vocab)
        if self.logit_softcap is not None:
            logits = self.logit_softcap * torch.tanh(logits / self.logit_softcap)
        return logits

    # ---- loading ----

    @classmethod
    def from_pretrained(cls, name_or_dir, dtype=None):
        """Load a causal LM with transformers: from a local directory in the hub's layout (config.json + weights),
        or by hub id through the library's own download and cache. dtype (e.g. torch.bfloat16) as the library
        takes it; None leaves the library's default."""
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        local = os.path.isdir(name_or_dir)
        if local and not os.path.isfile(os.path.join(name_or_dir, "config.json")):
            raise ValueError(f"{name_or_dir} holds no config.json: a model directory is in the hub's layout (as "
                             f"save_pretrained writes it: config.json and weights); supported: {SUPPORTED}")
        config = _fetch(AutoConfig.from_pretrained, name_or_dir)
        if getattr(config, "is_encoder_decoder", False) or config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ValueError(f"{name_or_dir}: model_type {config.model_type!r} is not a decoder-only causal language "
                             f"model; supported: {SUPPORTED}")
        kwargs = {} if dtype is None else {"dtype": dtype}
        if getattr(config, "attn_logit_softcapping", None) is not None:
            # Gemma 2 soft-caps its attention logits: ask for eager attention, which applies the cap, rather than
            # depend on the library's default choice
            kwargs["attn_implementation"] = "eager"
        hf = _fetch(AutoModelForCausalLM.from_pretrained, name_or_dir, **kwargs)
        model = cls(hf)
        model.name_or_path = os.path.abspath(name_or_dir) if local else name_or_dir
        return model


def _fetch(load, name_or_dir, **kwargs):
    """load(name_or_dir): a local directory as it is; a hub id through the library's download and cache, whose
    failure (offline, a typo) is explained with what was tried and what to do."""
    try:
        return load(name_or_dir, **kwargs)
    except Exception as e:
        if os.path.isdir(name_or_dir):
            raise
        raise RuntimeError(f"{name_or_dir!r} is not a local directory, and loading it as a Hugging Face hub id failed "
                           f"({type(e).__name__}: {e}). Offline, download it elsewhere and pass the directory holding "
                           "its config.json and weights instead") from e
