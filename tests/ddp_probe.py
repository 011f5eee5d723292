"""Run train.py's main under torchrun and record, for tests, what each rank did.

`python -m torch.distributed.run --nproc_per_node 2 tests/ddp_probe.py RECORD_DIR [train.py flags]
[--then train.py flags ...]` runs train.py's main once per group of flags, one after the other
in the same processes (so that one launch, whose start-up costs seconds, serves several runs),
and writes into RECORD_DIR (which the tests own, not the runs):
- weights-<out_dir name>-rank<R>-step<S>.pt, for a run given --record_weights: the rank's
  weights after every optimizer step, and
- writes-rank<R>.json: every file the rank opened for writing, created, renamed or deleted
  (seen through Python's audit hooks) in any of the runs, for ranks other than 0, which must
  write nothing.
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


def record_weights(record_dir: Path, rank: int, recorded_runs: set[str]) -> None:
    """Save the weights after every train_step of the Trainer of a run in `recorded_runs`
    (out_dir names), tagged with the run, the rank and the step."""
    import torch

    import trainer
    from distributed import gathered

    original = trainer.Trainer.train_step

    def train_step(self):
        loss = original(self)
        if self.out_dir.name in recorded_runs:
            weights = gathered(self.model.state_dict(), keep=True)  # whole, also under FSDP
            weights = {name: tensor.detach().clone() for name, tensor in weights.items()}
            torch.save(weights, record_dir / f"weights-{self.out_dir.name}-rank{rank}-step{self.step + 1}.pt")
        return loss

    trainer.Trainer.train_step = train_step


def split_runs(argv: list[str]) -> list[list[str]]:
    """The groups of train.py flags between the --then separators."""
    runs: list[list[str]] = [[]]
    for arg in argv:
        if arg == "--then":
            runs.append([])
        else:
            runs[-1].append(arg)
    return runs


def main() -> int:
    import torch.distributed as dist

    record_dir, runs = Path(sys.argv[1]), split_runs(sys.argv[2:])
    rank = int(os.environ.get("RANK", "0"))
    writes: list[str] = []
    recorded: set[str] = set()
    for argv in runs:
        if "--record_weights" in argv:
            argv.remove("--record_weights")
            recorded.add(Path(argv[argv.index("--out_dir") + 1]).name)
    record_weights(record_dir, rank, recorded)
    if rank != 0:
        record_writes(writes)
    import train
    from cli import run_cli

    dist.init_process_group("gloo")  # the runs join it (distributed.Collectives): torch sets up one per process
    try:
        return max([run_cli(train.main, argv) for argv in runs])  # every run, even after a failed one
    finally:
        dist.destroy_process_group()
        if rank != 0:
            ours = [w for w in writes if str(record_dir) not in w]  # the probe's own records
            (record_dir / f"writes-rank{rank}.json").write_text(json.dumps(ours))

if __name__ == "__main__":
    sys.exit(main())
