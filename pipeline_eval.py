"""The pipeline's eval phase: eval.py on each stage's checkpoint (base, mid, sft), one JSON each.

Each stage is scored on the same things, so the report's columns compare: bits per byte on
the base text's validation split, exact match of greedy replies on the held-out task chats,
and accuracy on each multiple-choice file ("tasks": the held-out questions as multiple choice).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline_config import TASK_CHATS, TRAINING_PHASES

if TYPE_CHECKING:  # pipeline.py imports this module
    from pipeline import Pipeline

EVAL_OUTPUTS = tuple(f"{stage}.json" for stage in TRAINING_PHASES)
EVAL_SCRIPT = Path(__file__).resolve().parent / "eval.py"


def multiple_choice_files(pipeline: "Pipeline") -> list[str]:
    return [str(pipeline.tasks.choices) if name == TASK_CHATS else name
            for name in pipeline.cfg.eval.multiple_choice]


def eval_command(pipeline: "Pipeline", stage: str) -> list[str]:
    command = [sys.executable, str(EVAL_SCRIPT), str(pipeline.handover(stage)), "--dataset", pipeline.cfg.dataset,
               "--split", "val", "--tasks", str(pipeline.tasks.held_out), *multiple_choice_files(pipeline),
               "--json", "--dtype", pipeline.cfg.eval.dtype]
    return command + (["--device", pipeline.device] if pipeline.device else [])


def stage_line(stage: str, record: dict) -> str:
    """One line of a stage's figures, for the terminal."""
    parts = [f"{record['bits_per_byte']:.3f} bits/byte"]
    parts += [f"{r['task']} {r['accuracy']:.0%}" for r in record.get("exact_match", [])]
    parts += [f"{Path(r['source']).name} {r['accuracy']:.0%} (chance {r['chance']:.0%})"
              for r in record.get("multiple_choice", [])]
    return f"[pipeline] eval {stage}: " + ", ".join(parts)


def evaluate_stages(pipeline: "Pipeline", log_path: Path) -> int:
    """Score every stage into RUN_DIR/eval/<stage>.json; return 0, or the failing run's status."""
    folder = log_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    for stage in TRAINING_PHASES:
        command = eval_command(pipeline, stage)
        done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(" ".join(command) + "\n" + done.stderr + done.stdout)
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"[pipeline] eval failed on {stage} ({last}); its log is {log_path}; fix it and run the "
                  "same command again", file=sys.stderr, flush=True)
            return done.returncode
        record = json.loads(done.stdout.strip().splitlines()[-1])
        (folder / f"{stage}.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        print(stage_line(stage, record), flush=True)
    return 0
