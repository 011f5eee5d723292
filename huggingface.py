"""Our models in Hugging Face's formats and back: config.json and the weights of
GPT2LMHeadModel or LlamaForCausalLM (hf_tokenizer.py writes the tokenizer files). export.py
writes folders with it; train.py's --load_model_only reads GPT-2 folders back (a GPT-2 of your
own, or one you trained here and exported), tokenizer included.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from config import Config, ModelConfig, config_to_dict, padded_vocab_size
from errors import UserError
from model import mlp_hidden_size
from tokenizer import (
    END_OF_TEXT,
    CharTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    Tokenizer,
)

# The options a model needs for transformers to compute exactly what it does: learned positions
# make it a GPT2LMHeadModel, rotary ones a LlamaForCausalLM.
FAMILIES = {
    "GPT-2": {"position": ("learned",), "norm": ("layernorm",), "mlp": ("gelu", "gelu_tanh"),
              "qk_norm": (False,)},
    "Llama": {"position": ("rope",), "norm": ("rmsnorm",), "mlp": ("swiglu",), "qk_norm": (False,),
              "bias": (False,)},
}
ROPE_BASE = 10000.0  # model.rotary_tables' default
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which model.py uses
# our MLP activation -> transformers' name for the same function, and back
ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
IMPORTED_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}

def hf_family(cfg: ModelConfig) -> str:
    """Return "GPT-2" or "Llama", the transformers model that computes exactly what ours does,
    or refuse naming the option that neither has."""
    if cfg.impl:
        raise UserError(f"this checkpoint's model is your own class ({cfg.impl}); export maps model.py's "
                        "weights to transformers' and knows no mapping for another class")
    family = "GPT-2" if cfg.position == "learned" else "Llama"
    for name, allowed in FAMILIES[family].items():
        value = getattr(cfg, name)
        if value not in allowed:
            needed = " or ".join(json.dumps(a) for a in allowed)
            raise UserError(f"model.{name} {json.dumps(value)} has no exact equivalent in a {family} model "
                            f"(model.position {cfg.position} makes it one; it needs {needed}), so this "
                            "checkpoint cannot be exported")
    if family == "GPT-2" and cfg.n_kv_head not in (None, cfg.n_head):
        raise UserError(f"model.n_kv_head {cfg.n_kv_head} (grouped-query attention) has no exact equivalent "
                        "in a GPT-2 model, so this checkpoint cannot be exported")
    return family


def hf_model(state: dict[str, torch.Tensor], cfg: ModelConfig, tokenizer: Tokenizer) -> tuple[dict, dict]:
    """Return (transformers' state dict, config.json) for our model's weights."""
    state = {name.removeprefix("_orig_mod.").removeprefix("module."): t for name, t in state.items()}
    if hf_family(cfg) == "GPT-2":
        weights, config = gpt2_weights(state, cfg), gpt2_config(cfg, tokenizer)
    else:
        weights, config = llama_weights(state, cfg), llama_config(cfg, tokenizer)
    return {name: t.detach().to(torch.float32).contiguous().clone() for name, t in weights.items()}, config


def gpt2_weights(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Return GPT2LMHeadModel's state dict for ours: its Conv1D layers hold (in, out) matrices,
    so the four per block are transposed; absent biases become zeros; a tied head is left out
    (transformers ties it to the embedding again)."""
    width = cfg.n_embd

    def bias(name: str, size: int) -> torch.Tensor:
        return state.get(name, torch.zeros(size))

    hf = {"transformer.wte.weight": state["wte.weight"], "transformer.wpe.weight": state["wpe.weight"]}
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}", f"transformer.h.{i}"
        for norm in ("ln_1", "ln_2"):
            hf[f"{theirs}.{norm}.weight"] = state[f"{ours}.{norm}.weight"]
            hf[f"{theirs}.{norm}.bias"] = bias(f"{ours}.{norm}.bias", width)
        for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            weight = state[f"{ours}.{layer}.weight"]
            hf[f"{theirs}.{layer}.weight"] = weight.t()
            hf[f"{theirs}.{layer}.bias"] = bias(f"{ours}.{layer}.bias", weight.shape[0])
    hf["transformer.ln_f.weight"] = state["ln_f.weight"]
    hf["transformer.ln_f.bias"] = bias("ln_f.bias", width)
    if not cfg.tie_embeddings:
        hf["lm_head.weight"] = state["lm_head.weight"]
    return hf


def llama_weights(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Return LlamaForCausalLM's state dict for ours: the fused q/k/v matrix split in three, the
    SwiGLU input matrix in its gate and up halves (model.MLP takes the gate first)."""
    head_size = cfg.n_embd // cfg.n_head
    kv_width = (cfg.n_kv_head or cfg.n_head) * head_size
    hf = {"model.embed_tokens.weight": state["wte.weight"], "model.norm.weight": state["ln_f.weight"]}
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}", f"model.layers.{i}"
        q, k, v = state[f"{ours}.attn.c_attn.weight"].split([cfg.n_embd, kv_width, kv_width])
        gate, up = state[f"{ours}.mlp.c_fc.weight"].chunk(2)
        hf.update({
            f"{theirs}.input_layernorm.weight": state[f"{ours}.ln_1.weight"],
            f"{theirs}.self_attn.q_proj.weight": q, f"{theirs}.self_attn.k_proj.weight": k,
            f"{theirs}.self_attn.v_proj.weight": v,
            f"{theirs}.self_attn.o_proj.weight": state[f"{ours}.attn.c_proj.weight"],
            f"{theirs}.post_attention_layernorm.weight": state[f"{ours}.ln_2.weight"],
            f"{theirs}.mlp.gate_proj.weight": gate, f"{theirs}.mlp.up_proj.weight": up,
            f"{theirs}.mlp.down_proj.weight": state[f"{ours}.mlp.c_proj.weight"]})
    if not cfg.tie_embeddings:
        hf["lm_head.weight"] = state["lm_head.weight"]
    return hf


def llama_config(cfg: ModelConfig, tokenizer: Tokenizer) -> dict:
    """Return config.json for LlamaForCausalLM with our sizes, RoPE base and RMSNorm epsilon."""
    end = tokenizer.special_ids.get(END_OF_TEXT)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd, "intermediate_size": mlp_hidden_size(cfg),
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head or cfg.n_head, "head_dim": cfg.n_embd // cfg.n_head,
        "hidden_act": "silu", "max_position_embeddings": cfg.block_size,
        # torch.nn.RMSNorm without an eps uses float32's machine epsilon, as model.py does
        "rms_norm_eps": torch.finfo(torch.float32).eps,
        "rope_theta": ROPE_BASE, "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_BASE},
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": end, "eos_token_id": end,
        "use_cache": True, "torch_dtype": "float32",
    }


def gpt2_config(cfg: ModelConfig, tokenizer: Tokenizer) -> dict:
    """Return config.json for GPT2LMHeadModel with our sizes and exact activation."""
    end = tokenizer.special_ids.get(END_OF_TEXT)
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": 4 * cfg.n_embd,
        "activation_function": ACTIVATIONS[cfg.mlp],  # exact GELU, or OpenAI GPT-2's tanh one
        "layer_norm_epsilon": LAYER_NORM_EPS, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": end, "eos_token_id": end, "use_cache": True, "torch_dtype": "float32",
    }


def generation_config(tokenizer: Tokenizer) -> dict:
    """gen.py's defaults, so `model.generate(do_sample=True)` samples as this project does."""
    end = tokenizer.special_ids.get(END_OF_TEXT)
    return {"bos_token_id": end, "eos_token_id": end, "do_sample": True, "temperature": 0.8, "top_k": 200}


# ---------------------------------------------------------------- reading a folder back


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read {path}: {error}") from None


def is_hf_folder(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and path.is_dir()


def model_config_from_hf(hf: dict, where: Path) -> ModelConfig:
    """Return our ModelConfig for a GPT-2 config.json, or refuse what we cannot compute exactly."""
    if hf.get("model_type") != "gpt2":
        raise UserError(f"{where} holds a {hf.get('model_type')!r} model; only GPT-2 folders import")
    activation = hf.get("activation_function", "gelu_new")
    n_embd = hf["n_embd"]
    problems = {
        f"activation_function {activation!r}": activation not in IMPORTED_ACTIVATIONS,
        f"layer_norm_epsilon {hf.get('layer_norm_epsilon', 1e-5)}": hf.get("layer_norm_epsilon", 1e-5)
        != LAYER_NORM_EPS,
        f"n_inner {hf.get('n_inner')}": hf.get("n_inner") not in (None, 4 * n_embd),
        "scale_attn_by_inverse_layer_idx": hf.get("scale_attn_by_inverse_layer_idx", False),
        "scale_attn_weights false": not hf.get("scale_attn_weights", True),
    }
    for what, bad in problems.items():
        if bad:
            raise UserError(f"{where}: {what} has no equivalent in this project's model, so it cannot "
                            "be imported")
    return ModelConfig(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=n_embd,
                       block_size=hf["n_positions"], vocab_size=hf["vocab_size"], bias=True,
                       mlp=IMPORTED_ACTIVATIONS[activation],
                       tie_embeddings=hf.get("tie_word_embeddings", True), dropout=0.0)


def weights_from_hf(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Return our state dict for GPT2LMHeadModel's (the inverse of gpt2_weights)."""
    hf = {name.removeprefix("transformer."): t for name, t in hf.items()}
    ours = {"wte.weight": hf["wte.weight"], "wpe.weight": hf["wpe.weight"],
            "ln_f.weight": hf["ln_f.weight"], "ln_f.bias": hf["ln_f.bias"]}
    for i in range(cfg.n_layer):
        for norm in ("ln_1", "ln_2"):
            for kind in ("weight", "bias"):
                ours[f"blocks.{i}.{norm}.{kind}"] = hf[f"h.{i}.{norm}.{kind}"]
        for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            ours[f"blocks.{i}.{layer}.weight"] = hf[f"h.{i}.{layer}.weight"].t()
            ours[f"blocks.{i}.{layer}.bias"] = hf[f"h.{i}.{layer}.bias"]
    ours["lm_head.weight"] = hf["wte.weight"] if cfg.tie_embeddings else hf["lm_head.weight"]
    return {name: tensor.to(torch.float32).contiguous() for name, tensor in ours.items()}


def tokenizer_from_hf(folder: Path) -> Tokenizer:
    """Return our tokenizer for the folder's: a SentencePiece model or a character vocabulary as
    export.py writes them, or GPT-2's byte-level BPE (tiktoken's gpt2 encoding, the same tokens)."""
    path = folder / "tokenizer.json"
    if (folder / "tokenizer.model").is_file():  # SentencePiece's own model, as export.py writes it
        return SentencePieceTokenizer((folder / "tokenizer.model").read_bytes())
    if path.is_file():
        spec = _read_json(path)
        model = spec.get("model", {})
        if model.get("type") == "WordLevel":
            chars = sorted(model["vocab"], key=model["vocab"].get)
            if all(len(ch) == 1 for ch in chars):
                return CharTokenizer("".join(chars))
        if model.get("type") == "BPE" and len(model.get("vocab", {})) == 50257:
            return TiktokenTokenizer("gpt2")
    elif (folder / "vocab.json").is_file() and len(_read_json(folder / "vocab.json")) == 50257:
        return TiktokenTokenizer("gpt2")
    raise UserError(f"{folder} has no tokenizer this project can use (a character tokenizer.json as "
                    "export.py writes it, or GPT-2's own BPE)")


def grow_vocabulary(weights: dict[str, torch.Tensor], cfg: ModelConfig, needed: int) -> ModelConfig:
    """Give the embedding (and an untied head) rows for tokens the model lacks (GPT-2's
    vocabulary gains the ChatML pair), at the mean embedding, up to a multiple of 64."""
    if needed <= cfg.vocab_size:
        return cfg
    size = padded_vocab_size(needed, 64)
    for name in ("wte.weight", "lm_head.weight"):
        rows = weights[name]
        extra = rows.mean(dim=0, keepdim=True).expand(size - rows.shape[0], -1)
        weights[name] = torch.cat([rows, extra])
    if cfg.tie_embeddings:
        weights["lm_head.weight"] = weights["wte.weight"]
    return dataclasses.replace(cfg, vocab_size=size)


def checkpoint_from_hf(folder: str | Path) -> dict:
    """Return a Hugging Face GPT-2 folder as a checkpoint-like dict (model, config, tokenizer)
    that --load_model_only starts from."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = model_config_from_hf(_read_json(folder / "config.json"), folder)
    weights_path = folder / "model.safetensors"
    if not weights_path.is_file():
        raise UserError(f"{folder} has no model.safetensors (other weight formats are not read); "
                        "save it with save_pretrained(..., safe_serialization=True)")
    try:
        hf_weights = load_file(weights_path)
    except (SafetensorError, OSError) as error:
        raise UserError(f"{weights_path} is damaged or not safetensors: {error}") from None
    try:
        weights = weights_from_hf(hf_weights, cfg)
    except KeyError as error:
        raise UserError(f"{weights_path} lacks the GPT-2 weight {error.args[0]}") from None
    tokenizer = tokenizer_from_hf(folder)
    cfg = grow_vocabulary(weights, cfg, tokenizer.vocab_size)
    biases = [name for name in weights if name.endswith(".bias")]
    if not any(weights[name].any() for name in biases):  # exported from a model without biases
        weights = {name: t for name, t in weights.items() if name not in biases}
        cfg = dataclasses.replace(cfg, bias=False)
    return {"model": weights, "config": config_to_dict(Config(model=cfg)), "tokenizer": tokenizer.to_dict(),
            "source": f"Hugging Face folder {folder}"}
