"""The pipeline's report card, RUN_DIR/report.md: what was run where, what each phase took and
reached, a table with a column per stage, and a few chats with the final model.

The summary's centred mean follows nanochat's ChatCORE: each task's accuracy is centred on
its chance level, (accuracy - chance) / (1 - chance), so 0 is guessing and 1 is perfect, and
the mean is taken over every task (exact-match tasks have chance 0).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from checkpoint import load_checkpoint
from config import config_from_dict, tokens_per_step
from guards import format_duration
from pipeline_config import PHASES, TRAINING_PHASES
from pipeline_state import read_state
from utils import write_file_atomic

if TYPE_CHECKING:  # pipeline.py imports this module
    from pipeline import Pipeline

REPORT = "report.md"
GEN_SCRIPT = Path(__file__).resolve().parent / "gen.py"
FORGOTTEN = "(conversation forgotten)"  # what gen.py --chat prints after /reset
ENVIRONMENT_KEYS = ("git_commit", "git_dirty", "device", "cpu", "cpu_threads", "torch", "cuda", "python", "os")


def percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def read_evals(pipeline: "Pipeline") -> dict[str, dict]:
    folder = pipeline.folder("eval")
    return {stage: json.loads((folder / f"{stage}.json").read_text(encoding="utf-8")) for stage in TRAINING_PHASES}


def summary_rows(evals: dict[str, dict]) -> list[list[str]]:
    """A row per metric, a column per stage: bits per byte, each task, each multiple-choice file,
    and the centred mean."""
    stages = list(evals)
    rows = [["bits per byte (base text, val)", *(f"{evals[s]['bits_per_byte']:.4f}" for s in stages)]]
    centred: dict[str, list[float]] = {s: [] for s in stages}
    for index, first in enumerate(evals[stages[0]].get("exact_match", [])):
        cells = []
        for stage in stages:
            accuracy = evals[stage]["exact_match"][index]["accuracy"]
            centred[stage].append(accuracy)
            cells.append(percent(accuracy))
        rows.append([f"{first['task']}: exact match", *cells])
    for index, first in enumerate(evals[stages[0]].get("multiple_choice", [])):
        cells = []
        for stage in stages:
            result = evals[stage]["multiple_choice"][index]
            centred[stage].append(result["centred"])
            cells.append(percent(result["accuracy"]))
        rows.append([f"{Path(first['source']).name}: multiple choice (chance {percent(first['chance'])})", *cells])
    rows.append(["centred mean (ChatCORE-style)",
                 *(f"{sum(centred[s]) / len(centred[s]):.4f}" if centred[s] else "n/a" for s in stages)])
    return rows


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def phase_rows(pipeline: "Pipeline") -> list[list[str]]:
    rows = []
    for phase in PHASES:
        state = read_state(pipeline.folder(phase))
        seconds = format_duration(state.seconds) if state else "not run"
        if phase == "report":
            seconds = "(in the total)"  # this phase is still running as the table is written
        if phase not in TRAINING_PHASES:
            rows.append([phase, seconds, "", "", "", "", ""])
            continue
        checkpoint = load_checkpoint(pipeline.folder(phase) / "ckpt.pt")
        cfg = config_from_dict(checkpoint["config"], f"{phase}'s checkpoint")
        tokens = checkpoint["step"] * tokens_per_step(cfg, checkpoint.get("processes", 1))
        losses = checkpoint["losses"]
        rows.append([phase, seconds, f"{checkpoint['step']:,}", f"{tokens:,}", f"{losses['final_train']:.4f}",
                     f"{losses['final_val']:.4f}", f"{losses['best_val']:.4f} (step {losses['best_val_step']})"])
    return rows


def unescape(line: str) -> str:
    """Undo chat.escape_reply, reading left to right."""
    out, i = [], 0
    while i < len(line):
        if line[i] == "\\" and i + 1 < len(line):
            out.append({"n": "\n", "r": "\r", "\\": "\\"}.get(line[i + 1], line[i:i + 2]))
            i += 2
        else:
            out.append(line[i])
            i += 1
    return "".join(out)


def sample_chats(pipeline: "Pipeline") -> list[tuple[str, str]]:
    """Each prompt as a fresh chat with the final model, greedy: (message, reply)."""
    prompts = pipeline.cfg.report.prompts
    if not prompts:
        return []
    command = [sys.executable, str(GEN_SCRIPT), str(pipeline.handover("sft")), "--chat", "--temperature", "0",
               "--max_new_tokens", "120", *(["--system", pipeline.cfg.report.system] if pipeline.cfg.report.system
                                            else []), *(["--device", pipeline.device] if pipeline.device else [])]
    stdin = "".join(f"{prompt}\n/reset\n" for prompt in prompts)
    done = subprocess.run(command, input=stdin, capture_output=True, text=True, check=False)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return [(prompt, f"(gen.py failed: {last})") for prompt in prompts]
    replies = [unescape(line) for line in done.stdout.splitlines() if line != FORGOTTEN]
    return list(zip(prompts, replies))


def write_report_card(pipeline: "Pipeline") -> Path:
    started = time.perf_counter()
    evals = read_evals(pipeline)
    environment = load_checkpoint(pipeline.folder("sft") / "ckpt.pt").get("environment", {})
    lines = [f"# Pipeline report: {pipeline.cfg.source.name}", "",
             f"Written {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by `{pipeline.command}`.",
             "", "## Environment", ""]
    lines += table(["", ""], [[key, f"`{environment[key]}`"] for key in ENVIRONMENT_KEYS if key in environment])
    lines += ["", "## Phases", ""]
    lines += table(["phase", "time", "steps", "tokens", "final train loss", "final val loss", "best val loss"],
                   phase_rows(pipeline))
    lines += [""] + [f"![{phase} loss]({phase}/loss.png)" for phase in TRAINING_PHASES
                     if (pipeline.folder(phase) / "loss.png").is_file()]
    lines += ["", "## Summary", ""]
    lines += table(["metric", *(stage.upper() for stage in evals)], summary_rows(evals))
    lines += ["", "Exact match: the greedy reply equals the answer. Multiple choice: the choice with the "
              "highest mean log-likelihood per character. Loss figures are per token."]
    lines += ["", "## Sample chats (final model, greedy)", ""]
    for message, reply in sample_chats(pipeline):
        lines += [f"- **you:** {message}  ", f"  **model:** {reply}"]  # two spaces: a line break
    total = sum(state.seconds for p in PHASES[:-1] if (state := read_state(pipeline.folder(p))))
    total += time.perf_counter() - started
    lines += ["", "## Total", "", f"Wall time of every phase, this report included: {format_duration(total)}."]
    path = pipeline.run_dir / REPORT
    write_file_atomic(path, lambda file: file.write(("\n".join(lines) + "\n").encode()))
    return path
