"""The model card (README.md) of an exported model: what it is, how it was made, how well it
does, what it is for, and how to load it; every figure read from the checkpoint."""
from __future__ import annotations

import math
from pathlib import Path

from checkpoint import model_config_from_checkpoint, tokens_seen
from config import Config, config_from_dict, tokens_per_step
from guards import format_duration
from tokenizer import tokenizer_from_dict

CARD_SECTIONS = ("Model", "Training data", "Tokenizer", "Training", "Results", "Intended use and limits",
                 "How to use")


def _table(rows: list[tuple[str, str]]) -> list[str]:
    cells = [(name, value.replace("|", "\\|")) for name, value in rows]  # <|endoftext|> in a table
    return ["| | |", "| --- | --- |", *[f"| {name} | {value} |" for name, value in cells], ""]


def _loss(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else "not evaluated"


ARCHITECTURES = {"GPT-2": "GPT-2 (`GPT2LMHeadModel`): learned positions, pre-LayerNorm blocks, GELU MLP",
                 "Llama": "Llama (`LlamaForCausalLM`): rotary positions, RMSNorm, SwiGLU MLP, no biases"}


def card_text(checkpoint: dict, checkpoint_path: Path, has_plot: bool, name: str, family: str) -> str:
    """Return the model card's Markdown for a checkpoint."""
    cfg: Config = config_from_dict(checkpoint["config"], "the checkpoint's config")
    model_cfg = model_config_from_checkpoint(checkpoint)
    tokenizer = tokenizer_from_dict(checkpoint["tokenizer"])
    params = sum(t.numel() for n, t in checkpoint["model"].items() if n != "lm_head.weight"
                 or not model_cfg.tie_embeddings)
    t, losses, env = cfg.training, checkpoint.get("losses", {}), checkpoint.get("environment", {})
    processes = checkpoint.get("processes", 1)
    step = checkpoint.get("step", 0)
    tokens = tokens_seen(checkpoint)
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             f"tags: [{family.lower().replace('-', '')}, text-generation, gpt-trainer]", "---", "",
             f"# {name}", "",
             f"A small GPT language model trained from scratch with gpt-trainer (plain PyTorch), "
             f"exported from `{checkpoint_path.name}` at step {step:,}.", ""]
    lines += ["## Model", "", *_table([
        ("architecture", ARCHITECTURES[family]),
        ("shape", f"{model_cfg.n_layer} layers, {model_cfg.n_head} heads, {model_cfg.n_embd} wide, "
                  f"context {model_cfg.block_size} tokens"),
        ("parameters", f"{params:,}"),
        ("tied embeddings", "yes" if model_cfg.tie_embeddings else "no")])]
    lines += ["## Training data", "", *_table([
        ("source", f"`{cfg.data.dataset}`"),
        ("held out for validation", f"the last {cfg.data.val_fraction:.0%} of the text")])]
    specials = ", ".join(f"`{s}`" for s in tokenizer.special_ids) or "none"
    lines += ["## Tokenizer", "", *_table([
        ("kind", tokenizer.kind),
        ("vocabulary", f"{tokenizer.vocab_size:,} tokens (the model's {model_cfg.vocab_size:,} rows "
                       "include padding)"),
        ("special tokens", specials)])]
    lines += ["## Training", "", *_table([
        ("steps", f"{step:,}"), ("tokens seen", f"{tokens:,}"),
        ("tokens per step", f"{tokens_per_step(cfg, processes):,} ({processes} process(es) x batch "
                            f"{t.batch_size} x accumulation {t.grad_accum_steps} x context "
                            f"{model_cfg.block_size})"),
        ("optimizer", f"{t.optimizer}, peak lr {t.lr:g}, {t.schedule} schedule"),
        ("training time", format_duration(checkpoint.get("elapsed_s", 0.0))),
        ("hardware", f"{env.get('device', 'unknown')} ({env.get('cpu', 'unknown CPU')}), "
                     f"{checkpoint.get('dtype') or 'dtype setting ' + cfg.system.dtype}"),
        ("software", f"torch {env.get('torch', 'unknown')}, gpt-trainer commit "
                     f"{env.get('git_commit', 'unknown')}")])]
    lines += ["## Results", "", "Mean cross-entropy per token (nats) from the run's evaluations:", "",
              *_table([
                  ("final", f"train {_loss(losses.get('final_train', math.nan))}, "
                            f"val {_loss(losses.get('final_val', math.nan))}"),
                  ("best val", f"{_loss(losses.get('best_val', math.nan))} at step "
                               f"{losses.get('best_val_step', 0):,}")])]
    if has_plot:
        lines += ["![training and validation loss](loss.png)", ""]
    lines += ["## Intended use and limits", "",
              f"A small model for learning and experiments: it continues text in the style of "
              f"`{Path(cfg.data.dataset).name}` and knows nothing beyond it. With "
              f"{params:,} parameters it makes spelling, grammar and factual mistakes, has no "
              "safety training, and should not be used where its output matters.", ""]
    lines += ["## How to use", "", "With transformers:", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
              f'model = AutoModelForCausalLM.from_pretrained("{name}")',
              'ids = tokenizer("ROMEO:", return_tensors="pt").input_ids',
              f"new = {max(1, model_cfg.block_size - 6)}  # prompt and new tokens fit the context of "
              f"{model_cfg.block_size} (learned positions end there)",
              "print(tokenizer.decode(model.generate(ids, max_new_tokens=new, do_sample=True)[0]))",
              "```", "", "With gpt-trainer, from the original checkpoint:", "", "```bash",
              f"python gen.py {checkpoint_path.name} --prompt \"ROMEO:\"",
              f"python eval.py {checkpoint_path.name} --text some.txt", "```", ""]
    return "\n".join(lines)


def write_model_card(path: Path, checkpoint: dict, checkpoint_path: Path, has_plot: bool,
                     family: str, name: str) -> None:
    """Write the card; `name`: what transformers loads the model by (a Hub repository id or a folder)."""
    text = card_text(checkpoint, checkpoint_path, has_plot, name, family)
    path.write_text(text, encoding="utf-8")

