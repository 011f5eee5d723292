"""The run report (report.md) and the environment record that also goes into checkpoints."""
from __future__ import annotations

import json
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from contract import source_sha256
from utils import cpu_has_native_bf16, cpu_name, write_file_atomic

CODE_DIR = Path(__file__).resolve().parent


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=CODE_DIR, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def environment(device: torch.device, model_impl: str = "") -> dict[str, str]:
    """Return what a person needs to reproduce the run: versions, hardware, code (with the file
    of a model class of the user's), command."""
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain")
    record = {
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # a str subclass that safe loading would refuse
        "cuda": str(torch.version.cuda or "none"),
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "os": platform.platform(),
        "cpu": cpu_name(),
        "cpu_native_bf16": "yes" if cpu_has_native_bf16() else "no",
        "cpu_threads": str(torch.get_num_threads()),
        "git_commit": commit or "unknown (not a git checkout)",
        "git_dirty": "unknown" if dirty is None else ("yes" if dirty else "no"),
        "command": " ".join(shlex.quote(arg) for arg in [Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    if model_impl:
        record["model_impl_sha256"] = source_sha256(model_impl) or "unknown (the file is gone)"
    return record


def write_report(path: Path, title: str, summary: list[tuple[str, str]], config: dict,
                 env: dict[str, str], plot_name: str | None) -> None:
    """Write report.md: the summary figures, the loss plot, the resolved config, the environment."""
    lines = [f"# {title}", "", "## Summary", "", "| | |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in summary]
    if plot_name:
        lines += ["", "## Loss", "", f"![loss curves]({plot_name})"]
    lines += ["", "## Config", "", "```json", json.dumps(config, indent=2), "```",
              "", "## Environment", "", "| | |", "| --- | --- |"]
    lines += [f"| {name} | `{value}` |" for name, value in env.items()]
    write_file_atomic(path, lambda file: file.write(("\n".join(lines) + "\n").encode()))
