"""What the pipeline knows of a phase between runs: RUN_DIR/<phase>/phase.json.

A phase is done when its phase.json says so, its fingerprint (the settings and inputs it ran
with) is today's, and every output it lists still has the SHA-256 it had when it finished.
Then it is skipped; otherwise it runs (again). Each input's fingerprint holds the outputs of
the phase before it, so a phase that ran again makes every later one run again too.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from utils import write_file_atomic

STATE_FILE = "phase.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 23):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(settings: object) -> str:
    """A short hash of JSON-able settings (with sorted keys, so order never matters)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class PhaseState:
    phase: str
    fingerprint: str
    status: str = "running"  # running | stopped | done
    seconds: float = 0.0  # wall time over every attempt that ran with this fingerprint
    outputs: dict = field(default_factory=dict)  # file name (in the phase's folder) -> sha256
    command: str = ""

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps(dataclasses.asdict(self), indent=2) + "\n"
        write_file_atomic(folder / STATE_FILE, lambda file: file.write(text.encode()))


def read_state(folder: Path) -> Optional[PhaseState]:
    """The phase's recorded state, or None when it never ran (or its file is unreadable)."""
    try:
        data = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        return PhaseState(**data)
    except (OSError, ValueError, TypeError):
        return None


def record_outputs(folder: Path, names: list[str]) -> dict:
    return {name: file_sha256(folder / name) for name in names}


def is_done(state: Optional[PhaseState], folder: Path, expected: str) -> bool:
    """Whether the phase finished with these settings and its outputs are still as it left them."""
    if state is None or state.status != "done" or state.fingerprint != expected or not state.outputs:
        return False
    return all((folder / name).is_file() and file_sha256(folder / name) == sha
               for name, sha in state.outputs.items())
