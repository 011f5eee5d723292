"""The one door between models and the disk: atomic saves and safe, checked loads.

A checkpoint is data, never code: plain tensors, numbers, strings, lists and dicts, so that
`torch.load(path, weights_only=True)` opens it without running anything it holds.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Optional

import torch

from config import Config, ModelConfig, config_from_dict, tokens_per_step
from config_fields import DTYPE_ALIASES
from contract import build_model, source_sha256
from errors import UserError
from quantize import apply_quantization
from utils import fsync_directory, notice, resolve_system, write_file_atomic

FORMAT = "gpt-trainer checkpoint"
FORMAT_VERSION = 2
# Fields that change the weights' shapes or what they compute; dropout, the attention kernel
# and the initialisation may change between runs.
ARCHITECTURE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias", "position",
                       "norm", "mlp", "qk_norm", "tie_embeddings", "n_kv_head")
LATEST = "ckpt.pt"  # what --resume continues from
BEST = "best.pt"  # the lowest validation loss so far
BEST_FIRST = (BEST, LATEST)  # what gen.py, eval.py and export.py take from a run directory
ROLLING = re.compile(r"ckpt-(\d+)\.pt")  # ckpt-<step>.pt, the newest keep_last of them


# ---------------------------------------------------------------- checksums


def _on_cpu(obj: Any, copy: bool = False) -> Any:
    """Return `obj` with every tensor on the CPU (dicts and lists rebuilt), copied once per
    storage: tensors that share memory on the device (a tied head and token embedding) share
    it on the CPU too, so torch.save writes it once, as it would have from the CPU. Copied one
    by one, the head would be a second matrix in the file (154 MB for GPT-2 124M).

    `copy`: copy what is on the CPU already too, so that the result is a snapshot the
    training can go on from (on the CPU device the state's tensors are the live parameters
    and moments, which the next step changes in place)."""
    copies: dict[tuple[torch.device, int], torch.UntypedStorage] = {}

    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return _view_on_cpu(value.detach(), copies, copy)
        if isinstance(value, dict):
            return {key: move(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(move(item) for item in value)
        return value

    return move(obj)


def _view_on_cpu(tensor: torch.Tensor, copies: dict[tuple[torch.device, int], torch.UntypedStorage],
                 copy: bool) -> torch.Tensor:
    """Return `tensor` as the same view of a CPU copy of its storage, copying the storage
    (whole, as torch.save writes it) only if `copies` does not hold it yet; without `copy`,
    a storage on the CPU already is used as it is."""
    storage = tensor.untyped_storage()
    key = (storage.device, storage.data_ptr())
    if key not in copies:
        as_bytes = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage)
        on_cpu = as_bytes.cpu()  # a copy from a GPU; the very storage from the CPU
        copies[key] = (on_cpu.clone() if copy and tensor.device.type == "cpu" else on_cpu).untyped_storage()
    view = torch.empty(0, dtype=tensor.dtype)
    return view.set_(copies[key], tensor.storage_offset(), tensor.shape, tensor.stride())


def _tensors(obj: Any, where: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield where, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _tensors(value, f"{where}/{key}")
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from _tensors(value, f"{where}/{index}")


def tensor_checksum(payload: Any) -> str:
    """Return the sha256 of every tensor's place, dtype, shape and bytes, in order."""
    digest = hashlib.sha256()
    for where, tensor in _tensors(payload):
        digest.update(f"{where}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


# ---------------------------------------------------------------- writing


def _write_checkpoint_file(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    try:
        write_file_atomic(path, write)
    except OSError as error:
        raise UserError(
            f"could not write checkpoint {path} ({error.strerror}); the previous one is untouched"
        ) from None
    return path


def checkpoint_snapshot(payload: dict) -> dict:
    """Return the payload stamped with format and version, every tensor a CPU copy of its own:
    what a background write serializes while the training goes on changing the originals."""
    return _on_cpu({"format": FORMAT, "version": FORMAT_VERSION, **payload}, copy=True)


def write_checkpoint(snapshot: dict, path: str | Path) -> Path:
    """Write a checkpoint_snapshot atomically, with the checksum of its tensors."""
    snapshot = {**snapshot, "checksum": tensor_checksum(snapshot)}
    return _write_checkpoint_file(Path(path), lambda file: torch.save(snapshot, file))


def save_checkpoint(payload: dict, path: str | Path) -> Path:
    """Write a checkpoint atomically, stamped with format, version and a tensor checksum."""
    return write_checkpoint(_on_cpu({"format": FORMAT, "version": FORMAT_VERSION, **payload}), path)


def copy_checkpoint(source: str | Path, target: str | Path) -> Path:
    """Copy a checkpoint file atomically (e.g. ckpt.pt to best.pt)."""
    with open(source, "rb") as src:
        return _write_checkpoint_file(Path(target), lambda file: shutil.copyfileobj(src, file))


def link_checkpoint(source: Path, target: Path) -> Path:
    """Make `target` another name of the checkpoint file `source` (a hard link: no bytes
    copied), replacing an existing `target` atomically; copy it where links fail (a
    filesystem without them). Every checkpoint is written to a new file and renamed into
    place (write_file_atomic), never rewritten in place, so a later ckpt.pt is a new file
    and leaves what best.pt or ckpt-<step>.pt name as it was."""
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        partial.unlink(missing_ok=True)
        os.link(source, partial)
        os.replace(partial, target)
    except OSError:
        partial.unlink(missing_ok=True)
        return copy_checkpoint(source, target)
    fsync_directory(target.parent)
    return target


def rolling_checkpoints(run_dir: Path) -> list[Path]:
    """Return the run's ckpt-<step>.pt files, newest step first."""
    found = [(int(m.group(1)), p) for p in run_dir.glob("ckpt-*.pt") if (m := ROLLING.fullmatch(p.name))]
    return [path for _, path in sorted(found, reverse=True)]


def keep_rolling_copy(latest: Path, step: int, keep_last: int) -> None:
    """Link ckpt.pt as ckpt-<step>.pt and delete all but the newest `keep_last` such copies."""
    if keep_last > 0:
        link_checkpoint(latest, latest.with_name(f"ckpt-{step}.pt"))
    for old in rolling_checkpoints(latest.parent)[keep_last:]:
        old.unlink(missing_ok=True)


# ---------------------------------------------------------------- reading


def find_checkpoint(path: str | Path, prefer: tuple[str, ...] = (LATEST,)) -> Path:
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
    saved_checksum = checkpoint.pop("checksum", None)
    if saved_checksum != tensor_checksum(checkpoint):
        raise UserError(f"{path} is damaged: its tensors do not match their checksum; "
                        "use another checkpoint, e.g. an earlier ckpt-<step>.pt")
    return migrate(checkpoint)


def _char_tokenizer_without_specials(checkpoint: dict) -> dict:
    """1 -> 2 (2026-11-23): tokenizers gained <|endoftext|> and the ChatML tokens; a version-1
    character tokenizer has none, and says so."""
    tokenizer = checkpoint.get("tokenizer", {})
    if tokenizer.get("kind") == "char":
        tokenizer.setdefault("specials", False)
    return checkpoint


MIGRATIONS: dict[int, Callable[[dict], dict]] = {1: _char_tokenizer_without_specials}  # version -> to next


def migrate(checkpoint: dict) -> dict:
    """Lift a checkpoint written by an older version of this trainer to the current format,
    one migration per format change."""
    version = checkpoint.get("version", 1)
    while version < FORMAT_VERSION:
        checkpoint = MIGRATIONS[version](checkpoint)
        version += 1
    checkpoint["version"] = version
    return checkpoint


def load_resumable(path: Path) -> tuple[dict, Path]:
    """Return the checkpoint named (which must verify), or the newest valid one in a run directory."""
    if path.is_dir():
        return load_latest_valid(path)
    return load_checkpoint(path), path


def load_latest_valid(run_dir: Path) -> tuple[dict, Path]:
    """Return the newest checkpoint in a run directory that verifies, and its path.

    ckpt.pt is always written before its rolling copy, so it is the newest; if it is damaged,
    the rolling copies are tried newest first, with a notice for each one skipped.
    """
    candidates = [p for p in [run_dir / LATEST, *rolling_checkpoints(run_dir)] if p.is_file()]
    if not candidates:
        raise UserError(f"nothing to resume: {run_dir / LATEST} does not exist; "
                        "train without --resume first")
    for path in candidates:
        try:
            return load_checkpoint(path), path
        except UserError as error:
            notice(f"skipping a checkpoint that does not verify: {error}")
    raise UserError(f"no checkpoint in {run_dir} verifies; start again with --overwrite")


@dataclasses.dataclass(frozen=True)
class TokenCount:
    """The tokens a run has trained on by `step`, and `per_step` more each step from there: a
    resumed run counts on from its checkpoint's total, whatever batch or processes it had."""

    step: int
    tokens: int
    per_step: int

    def at(self, step: int) -> int:
        return self.tokens + (step - self.step) * self.per_step


def tokens_per_step_of(checkpoint: dict) -> int:
    """The tokens a step trained on in the session that wrote the checkpoint."""
    return tokens_per_step(config_from_dict(checkpoint["config"], "the checkpoint's config"),
                           checkpoint.get("processes", 1))


def tokens_seen(checkpoint: dict) -> int:
    """The tokens the run had trained on by its checkpoint's step (estimated from the last
    session's tokens per step for checkpoints written before the count was kept)."""
    return checkpoint["tokens"] if "tokens" in checkpoint else checkpoint["step"] * tokens_per_step_of(checkpoint)


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


def with_architecture_of(cfg: Config, checkpoint: dict) -> Config:
    """Return `cfg` with the model's shape taken from the checkpoint: for an imported model,
    whose weights fix it (dropout and the other settings stay the config's)."""
    saved = checkpoint["config"]["model"]
    shape = {name: saved[name] for name in ARCHITECTURE_FIELDS}
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **shape))


def model_config_from_checkpoint(checkpoint: dict) -> ModelConfig:
    return ModelConfig(**checkpoint["config"]["model"])


def weights_mismatch(expected: dict, given: dict) -> Optional[str]:
    """Say how the tensors `given` fail to fit a model whose state dict is `expected`, or None."""
    missing = [name for name in expected if name not in given]
    if missing:
        more = f" and {len(missing) - 1} more tensors" if len(missing) > 1 else ""
        return f"they lack {missing[0]}{more}"
    extra = [name for name in given if name not in expected]
    if extra:
        return f"they hold {extra[0]}, which the model has no place for"
    for name, tensor in expected.items():
        if tuple(tensor.shape) != tuple(given[name].shape):
            return f"{name} is {tuple(given[name].shape)} there but {tuple(tensor.shape)} in the model"
    return None


def load_model(checkpoint: dict, device: torch.device, path: str, dtype: torch.dtype = torch.float32,
               impl: Optional[str] = None) -> torch.nn.Module:
    """Return the checkpoint's model in eval mode on `device`, its weights in `dtype`: decoding
    reads every weight once per token, so half-size weights halve its memory traffic. `impl`
    names the class where the one it was trained with has moved (--model_impl)."""
    cfg = model_config_from_checkpoint(checkpoint)
    if impl is not None:
        cfg = dataclasses.replace(cfg, impl=impl)
    try:
        model = build_model(cfg)
    except UserError as error:
        hint = "; pass --model_impl path/to/file.py:Class" if cfg.impl else ""
        raise UserError(f"cannot build the model of {path}: {error}{hint}") from None
    mismatch = weights_mismatch(model.state_dict(), checkpoint["model"])
    if mismatch:
        raise UserError(f"the weights in {path} do not fit {type(model).__name__}: {mismatch}")
    trained_with = checkpoint.get("environment", {}).get("model_impl_sha256")
    if trained_with and source_sha256(cfg.impl) != trained_with:
        notice(f"{cfg.impl.rpartition(':')[0]} has changed since {path} was trained; its weights are loaded "
               "into the class as the file defines it now")
    model.load_state_dict(checkpoint["model"])
    return model.to(device=device, dtype=dtype).eval()


@dataclasses.dataclass
class LoadedModel:
    """What the commands that run a trained model (gen.py, serve.py) load from their flags."""

    model: torch.nn.Module
    checkpoint: dict
    path: Path
    device: torch.device
    params: int  # counted before any quantisation


def load_for_inference(args: Any) -> LoadedModel:
    """The model named by cli.add_model_loading_flags' flags (and a `checkpoint` argument):
    found (best.pt first), on its device in its dtype, quantised as asked."""
    path = find_checkpoint(args.checkpoint, prefer=BEST_FIRST)
    checkpoint = load_checkpoint(path)
    system = resolve_system(args.device, DTYPE_ALIASES.get(args.dtype, args.dtype), compile_requested=False)
    model = load_model(checkpoint, system.device, str(path), system.dtype, impl=args.model_impl)
    params = model.num_params()
    return LoadedModel(apply_quantization(model, args.quantize), checkpoint, path, system.device, params)
