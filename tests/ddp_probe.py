"""Run train.py's main under torchrun and record, for tests, what each rank did.

`python -m torch.distributed.run --nproc_per_node 2 tests/ddp_probe.py RECORD_DIR [train.py flags]`
writes into RECORD_DIR (which the tests own, not the run):
- weights-rank<R>-step<S>.pt: the rank's weights after every optimizer step, and
- writes-rank<R>.json: every file the rank opened for writing, created, renamed or deleted
  (seen through Python's audit hooks), for ranks other than 0, which must write nothing.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

WRITE_EVENTS = {"os.rename", "os.replace", "os.remove", "os.unlink", "os.mkdir", "shutil.copyfile",
                "shutil.move", "os.truncate"}


def record_writes(into: list[str]) -> None:
    """Add every file-writing operation of this process to `into`."""
    def hook(event: str, args: tuple) -> None:
        if event == "open" and len(args) >= 2:
            path, mode, flags = args[0], args[1], args[2] if len(args) > 2 else 0
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing and isinstance(path, (str, bytes, os.PathLike)):
                into.append(f"open {os.fsdecode(path)} {mode!r}")
        elif event in WRITE_EVENTS:
            into.append(f"{event} {args[0]!r}")
    sys.addaudithook(hook)


def record_weights(record_dir: Path, rank: int) -> None:
    """Save the weights after every train_step of the Trainer, tagged with rank and step."""
    import torch

    import trainer
    from distributed import gathered

    original = trainer.Trainer.train_step

    def train_step(self):
        loss = original(self)
        weights = gathered(self.model.state_dict(), keep=True)  # whole, also under FSDP
        weights = {name: tensor.detach().clone() for name, tensor in weights.items()}
        torch.save(weights, record_dir / f"weights-rank{rank}-step{self.step + 1}.pt")
        return loss

    trainer.Trainer.train_step = train_step


def main() -> int:
    record_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    rank = int(os.environ.get("RANK", "0"))
    writes: list[str] = []
    if "--record_weights" in argv:
        argv.remove("--record_weights")
        record_weights(record_dir, rank)
    if rank != 0:
        record_writes(writes)
    import train
    from cli import run_cli

    try:
        return run_cli(train.main, argv)
    finally:
        if rank != 0:
            ours = [w for w in writes if str(record_dir) not in w]  # the probe's own records
            (record_dir / f"writes-rank{rank}.json").write_text(json.dumps(ours))


if __name__ == "__main__":
    sys.exit(main())
