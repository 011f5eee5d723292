"""The one door between models and the disk: atomic saves and safe, checked loads.

A checkpoint is data, never code: plain tensors, numbers, strings, lists and dicts, so that
`torch.load(path, weights_only=True)` opens it without running anything it holds.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import BinaryIO, Callable

import torch

from config import ModelConfig
from errors import UserError
from utils import write_file_atomic

FORMAT = "gpt-trainer checkpoint"
FORMAT_VERSION = 1
# Fields that change the shapes of the weights; dropout may change between runs.
ARCHITECTURE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")


def _write_checkpoint_file(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    try:
        write_file_atomic(path, write)
    except OSError as error:
        raise UserError(
            f"could not write checkpoint {path} ({error.strerror}); the previous one is untouched"
        ) from None
    return path


def save_checkpoint(payload: dict, path: str | Path) -> Path:
    """Write a checkpoint atomically, stamped with this trainer's format and version."""
    payload = {"format": FORMAT, "version": FORMAT_VERSION, **payload}
    return _write_checkpoint_file(Path(path), lambda file: torch.save(payload, file))


def copy_checkpoint(source: str | Path, target: str | Path) -> Path:
    """Copy a checkpoint file atomically (e.g. ckpt.pt to best.pt)."""
    with open(source, "rb") as src:
        return _write_checkpoint_file(Path(target), lambda file: shutil.copyfileobj(src, file))


def find_checkpoint(path: str | Path, prefer: tuple[str, ...] = ("ckpt.pt",)) -> Path:
    """Return the checkpoint file named by `path`, or the first of `prefer` in a run directory."""
    path = Path(path)
    if path.is_dir():
        for name in prefer:
            if (path / name).is_file():
                return path / name
        raise UserError(f"no checkpoint ({' or '.join(prefer)}) in {path}; train one first")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Return the checkpoint's contents, loaded safely onto the CPU, or raise UserError."""
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except Exception as error:  # any unpickling failure means the file cannot be trusted
        raise UserError(
            f"{path} is corrupt or not a checkpoint ({type(error).__name__}); "
            "use another file, e.g. best.pt or an earlier copy"
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise UserError(f"{path} is not a checkpoint written by this trainer")
    if checkpoint.get("version", 0) > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer version of this trainer; upgrade to load it")
    return checkpoint


def check_same_architecture(checkpoint: dict, model_cfg: ModelConfig, path: str | Path) -> None:
    """Raise UserError when the checkpoint's weights cannot fit a model built from `model_cfg`."""
    saved = checkpoint["config"]["model"]
    for name in ARCHITECTURE_FIELDS:
        ours = getattr(model_cfg, name)
        if saved.get(name) != ours:
            raise UserError(
                f"checkpoint {path} is from another architecture: it has model.{name}="
                f"{saved.get(name)} but the config says {ours}; use the config it was trained with"
            )


def model_config_from_checkpoint(checkpoint: dict) -> ModelConfig:
    return ModelConfig(**checkpoint["config"]["model"])
