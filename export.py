"""Export a checkpoint as a Hugging Face model folder: `python export.py models/tiny --out hf/tiny`.

`transformers.AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)`
load the folder with no code from this project. A GPT-2-shaped model (learned positions,
LayerNorm, GELU MLP, one key/value head per query head, no QK-norm) becomes a GPT2LMHeadModel;
any other option has no exact GPT-2 equivalent and is refused by name. Files written:
config.json, model.safetensors, generation_config.json, the tokenizer's files and README.md
(the model card).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Sequence

import torch

from checkpoint import find_checkpoint, load_checkpoint, model_config_from_checkpoint
from cli import CliParser, run_cli
from config import ModelConfig
from errors import UserError
from model_card import write_model_card
from tokenizer import END_OF_TEXT, IM_END, IM_START, Tokenizer, tokenizer_from_dict

# The GPT-2 shape: each option a model needs for GPT2LMHeadModel to compute exactly what it does.
GPT2_SHAPE = {"position": "learned", "norm": "layernorm", "mlp": "gelu", "qk_norm": False}
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which model.py uses

# ChatML, as chat.py writes it, in the Jinja that transformers' apply_chat_template runs.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '" + IM_START + "' + message['role'] + '\\n' + message['content'] + '"
    + IM_END + "\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '" + IM_START + "assistant\\n' }}"
    "{% endif %}"
)


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(description="Export a checkpoint as a Hugging Face model folder.", allow_abbrev=False)
    parser.add_argument("checkpoint", help="a checkpoint file, or a run directory (best.pt, else ckpt.pt)")
    parser.add_argument("--out", required=True, help="the folder to write (created; must be empty)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return parser


def check_gpt2_shape(cfg: ModelConfig) -> None:
    """Refuse, naming the option, a model that GPT2LMHeadModel cannot compute exactly."""
    for name, needed in GPT2_SHAPE.items():
        value = getattr(cfg, name)
        if value != needed:
            raise UserError(f"model.{name} {json.dumps(value)} has no exact equivalent in a GPT-2 model "
                            f"(it needs {json.dumps(needed)}), so this checkpoint cannot be exported yet")
    if cfg.n_kv_head not in (None, cfg.n_head):
        raise UserError(f"model.n_kv_head {cfg.n_kv_head} (grouped-query attention) has no exact equivalent "
                        "in a GPT-2 model, so this checkpoint cannot be exported yet")


def gpt2_weights(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Return GPT2LMHeadModel's state dict for ours: its Conv1D layers hold (in, out) matrices,
    so the four per block are transposed; absent biases become zeros; a tied head is left out
    (transformers ties it to the embedding again)."""
    state = {name.removeprefix("_orig_mod.").removeprefix("module."): t for name, t in state.items()}
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
    return {name: tensor.detach().to(torch.float32).contiguous().clone() for name, tensor in hf.items()}


def gpt2_config(cfg: ModelConfig, tokenizer: Tokenizer) -> dict:
    """Return config.json for GPT2LMHeadModel with our sizes and exact activation."""
    end = tokenizer.special_ids.get(END_OF_TEXT)
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": 4 * cfg.n_embd,
        "activation_function": "gelu",  # torch's exact GELU, as model.py; GPT-2's own is gelu_new (tanh)
        "layer_norm_epsilon": LAYER_NORM_EPS, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": end, "eos_token_id": end, "use_cache": True, "torch_dtype": "float32",
    }


def generation_config(tokenizer: Tokenizer) -> dict:
    """gen.py's defaults, so `model.generate(do_sample=True)` samples as this project does."""
    end = tokenizer.special_ids.get(END_OF_TEXT)
    return {"bos_token_id": end, "eos_token_id": end, "do_sample": True, "temperature": 0.8, "top_k": 200}


def char_tokenizer_json(tokenizer: Tokenizer) -> str:
    """Return tokenizer.json (the `tokenizers` library's format) that encodes as our character
    tokenizer does: every character alone looked up in the vocabulary, the special tokens after."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab = {ch: i for i, ch in enumerate(tokenizer.chars)}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token=None))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    hf.decoder = decoders.Fuse()
    hf.add_special_tokens(list(tokenizer.special_ids))
    for name, index in tokenizer.special_ids.items():
        if hf.token_to_id(name) != index:
            raise UserError(f"the exported tokenizer numbers {name} {hf.token_to_id(name)}, not {index}")
    return hf.to_str()


def tokenizer_files(tokenizer: Tokenizer, block_size: int) -> dict[str, str]:
    """Return the tokenizer's files for AutoTokenizer, by name."""
    if tokenizer.kind != "char":
        raise UserError(f"exporting a {tokenizer.kind} tokenizer is not built yet; only character "
                        "tokenizers export for now")
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
                "clean_up_tokenization_spaces": False}
    if END_OF_TEXT in tokenizer.special_ids:
        settings.update(bos_token=END_OF_TEXT, eos_token=END_OF_TEXT)
    if IM_START in tokenizer.special_ids:
        settings["chat_template"] = CHATML_TEMPLATE
    return {"tokenizer.json": char_tokenizer_json(tokenizer),
            "tokenizer_config.json": json.dumps(settings, indent=2)}


def export(checkpoint_path: Path, out: Path) -> list[Path]:
    """Write the Hugging Face folder for a checkpoint; return the files written."""
    from safetensors.torch import save_file

    checkpoint = load_checkpoint(checkpoint_path)
    cfg = model_config_from_checkpoint(checkpoint)
    tokenizer = tokenizer_from_dict(checkpoint["tokenizer"])
    check_gpt2_shape(cfg)
    files = tokenizer_files(tokenizer, cfg.block_size)  # before anything is written: it may refuse
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty; choose a new --out folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        weights = gpt2_weights(checkpoint["model"], cfg)
        save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
        files["config.json"] = json.dumps(gpt2_config(cfg, tokenizer), indent=2)
        files["generation_config.json"] = json.dumps(generation_config(tokenizer), indent=2)
        for name, text in files.items():
            (out / name).write_text(text + "\n", encoding="utf-8")
        plot = checkpoint_path.parent / "loss.png"
        if plot.is_file():
            shutil.copyfile(plot, out / "loss.png")
        write_model_card(out / "README.md", checkpoint, checkpoint_path, plot.is_file())
    except OSError as error:
        raise UserError(f"cannot write {out}: {error.strerror}") from None
    return sorted(out.iterdir())


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    path = find_checkpoint(args.checkpoint, prefer=("best.pt", "ckpt.pt"))
    written = export(path, Path(args.out))
    print(f"exported {path} to {args.out}: {', '.join(p.name for p in written)}")
    print(f"load it with transformers: AutoModelForCausalLM.from_pretrained({str(args.out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
