"""Checkpoint files: stamped, atomic, safely loaded, and refused when they cannot be trusted."""
from __future__ import annotations

import pytest
import torch

import checkpoint
import gen
from checkpoint import FORMAT_VERSION, find_checkpoint, load_checkpoint, save_checkpoint
from cli import run_cli
from config import Config, ModelConfig, SystemConfig, config_to_dict
from errors import UserError
from model import GPT


def test_round_trip_is_plain_data(tmp_path):
    path = save_checkpoint({"model": {"w": torch.ones(2)}, "step": 4}, tmp_path / "ckpt.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == checkpoint.FORMAT and raw["version"] == FORMAT_VERSION
    assert load_checkpoint(path)["step"] == 4


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint({"step": 1}, tmp_path / "ckpt.pt")

    def disk_full(obj, file):
        file.write(b"partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(UserError, match="No space left on device.*previous one is untouched"):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_a_newer_format_is_refused(tmp_path):
    path = tmp_path / "future.pt"
    torch.save({"format": checkpoint.FORMAT, "version": FORMAT_VERSION + 1}, path)
    with pytest.raises(UserError, match="newer version"):
        load_checkpoint(path)


def test_pickled_code_is_never_run(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (print, ("this must not run",))

    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "x": Payload()}, path)
    with pytest.raises(UserError, match="corrupt or not a checkpoint"):
        load_checkpoint(path)
    assert "must not run" not in capsys.readouterr().out


def test_find_checkpoint_prefers_in_order(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"")
    assert find_checkpoint(tmp_path) == tmp_path / "ckpt.pt"
    assert find_checkpoint(tmp_path, prefer=("best.pt", "ckpt.pt")) == tmp_path / "ckpt.pt"
    (tmp_path / "best.pt").write_bytes(b"")
    assert find_checkpoint(tmp_path, prefer=("best.pt", "ckpt.pt")) == tmp_path / "best.pt"


def test_a_version_1_checkpoint_is_migrated_and_generates(tmp_path, capsys):
    """Version 1 (before special tokens): its char tokenizer has no "specials" key."""
    model_cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=5)
    weights = GPT(model_cfg).state_dict()
    payload = {"format": checkpoint.FORMAT, "version": 1, "model": weights, "step": 3,
               "config": config_to_dict(Config(model=model_cfg)),
               "tokenizer": {"kind": "char", "chars": "\nabcd"}}
    payload["checksum"] = checkpoint.tensor_checksum(payload)
    torch.save(payload, tmp_path / "v1.pt")  # as version 1 wrote it
    loaded = load_checkpoint(tmp_path / "v1.pt")
    assert loaded["version"] == FORMAT_VERSION == 2
    assert loaded["tokenizer"] == {"kind": "char", "chars": "\nabcd", "specials": False}
    assert run_cli(gen.main, [str(tmp_path / "v1.pt"), "--prompt", "ab", "--max_new_tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ab") and len(out) == 2 + 5 + 1 and set(out) <= set("\nabcd")
    assert set(checkpoint.MIGRATIONS) == set(range(1, FORMAT_VERSION))  # one function per change


def test_tied_weights_are_saved_once_and_load_tied(tmp_path, monkeypatch):
    """From a GPU every tensor is copied to the CPU; the tied head must not become a second copy."""
    model_cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=512)  # most of it
    model = GPT(model_cfg)
    state = model.state_dict()
    config = config_to_dict(Config(model=model_cfg, system=SystemConfig(device="cpu", dtype="float32")))
    without_head = save_checkpoint({"model": {k: v for k, v in state.items() if k != "lm_head.weight"},
                                    "config": config}, tmp_path / "without_head.pt")
    real_cpu = torch.Tensor.cpu
    with monkeypatch.context() as patch:  # .cpu() returns a fresh copy, as it does of a CUDA tensor
        patch.setattr(torch.Tensor, "cpu", lambda self, *args, **kw: real_cpu(self, *args, **kw).clone())
        path = save_checkpoint({"model": state, "config": config}, tmp_path / "ckpt.pt")
    embedding_bytes = model.wte.weight.numel() * model.wte.weight.element_size()
    assert path.stat().st_size < without_head.stat().st_size + embedding_bytes / 10  # the head is no copy

    loaded = load_checkpoint(path)  # its checksum verifies
    weights = loaded["model"]
    storages = {weights[name].untyped_storage().data_ptr() for name in ("lm_head.weight", "wte.weight")}
    assert len(storages) == 1  # one tensor under two names, as in the model
    restored = checkpoint.load_model(loaded, torch.device("cpu"), str(path))
    assert restored.lm_head.weight is restored.wte.weight
    assert torch.equal(restored.wte.weight, model.wte.weight)
    restored.train()
    optimizer = torch.optim.AdamW(restored.parameters(), lr=1e-2)
    x = torch.randint(0, 512, (2, 16))
    restored(x, x)[1].backward()
    optimizer.step()
    assert restored.lm_head.weight is restored.wte.weight  # one matrix still, trained as one
    assert not torch.equal(restored.wte.weight, model.wte.weight)


def test_a_snapshot_is_a_copy_that_keeps_tied_weights_one_tensor():
    """On the CPU the state's tensors are the live weights: a background write needs its own."""
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64))
    snapshot = checkpoint.checkpoint_snapshot({"model": model.state_dict(), "step": 3})
    weights = snapshot["model"]
    storages = {weights[name].untyped_storage().data_ptr() for name in ("lm_head.weight", "wte.weight")}
    assert len(storages) == 1  # tied: one tensor still
    before = weights["wte.weight"].clone()
    with torch.no_grad():
        model.wte.weight.add_(1.0)  # the next training step
    assert torch.equal(weights["wte.weight"], before)
    assert (snapshot["format"], snapshot["version"]) == (checkpoint.FORMAT, FORMAT_VERSION)
    assert snapshot["step"] == 3


def inode(path) -> int:
    return path.stat().st_ino


def test_best_and_rolling_copies_are_links_that_a_later_save_leaves_alone(tmp_path):
    latest, best = tmp_path / checkpoint.LATEST, tmp_path / checkpoint.BEST
    for step in (3, 4, 5):
        save_checkpoint({"model": {"w": torch.full((4,), float(step))}, "step": step}, latest)
        checkpoint.keep_rolling_copy(latest, step, keep_last=2)
        if step == 3:
            checkpoint.link_checkpoint(latest, best)
            assert inode(best) == inode(latest) == inode(tmp_path / "ckpt-3.pt")  # one file, three names
            best_bytes = best.read_bytes()
    assert inode(latest) == inode(tmp_path / "ckpt-5.pt") != inode(best)  # ckpt.pt is a new file each save
    assert best.read_bytes() == best_bytes and load_checkpoint(best)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "ckpt-4.pt", "ckpt-5.pt", "ckpt.pt"]
    checkpoint.link_checkpoint(latest, best)  # a new best replaces the old name, atomically
    assert inode(best) == inode(latest) and load_checkpoint(best)["step"] == 5
    assert load_checkpoint(tmp_path / "ckpt-4.pt")["model"]["w"][0] == 4.0


def test_without_hard_links_the_names_are_copies(tmp_path, monkeypatch):
    latest, best = tmp_path / checkpoint.LATEST, tmp_path / checkpoint.BEST
    save_checkpoint({"step": 1}, latest)
    best.write_bytes(b"an older best")

    def no_links(source, target):
        raise OSError(1, "Operation not permitted")  # FAT, some network filesystems

    monkeypatch.setattr(checkpoint.os, "link", no_links)
    checkpoint.link_checkpoint(latest, best)
    assert inode(best) != inode(latest) and best.read_bytes() == latest.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "ckpt.pt"]  # no temporary left
