"""From raw text to a chat model in one command: `python pipeline.py --config configs/pipeline_laptop.json`.

Phases, in order, each writing into RUN_DIR/<phase>/:
  tokenizer  the task chats (tasks.py's, words from the base text) and the tokenizer fitted to
             the base text and them (a tiktoken encoding needs no fitting)
  base       pretraining on the base text                      (train.py)
  mid        the base model on base text and task chats mixed  (train.py --load_model_only)
  sft        the mid model on chats, loss on the replies only  (train.py --load_model_only)
  eval       each stage's bits per byte, exact match on held-out task chats, multiple choice (eval.py)
  report     RUN_DIR/report.md: environment, phases, a table per stage, sample chats (gen.py --chat)
A phase that finished with the same settings and inputs is skipped (pipeline_state.py); one
that was interrupted resumes from its newest valid checkpoint; `--from PHASE` runs again from
there, `--only PHASE` just that one. Flags the pipeline does not know go to every training
phase (`--max_time 5m`), `--base.FIELD VALUE` to one phase only (`--mid.lr 1e-3`), and
`--tasks.FIELD VALUE` (tokenizer, tasks, eval, report) change the pipeline config's own sections.
"""
from __future__ import annotations

import argparse
import re
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import train
from checkpoint import BEST_FIRST, find_checkpoint, load_checkpoint
from cli import CliParser, overrides_from_args, run_cli
from config import config_to_dict, resolve_config
from errors import UserError
from pipeline_config import PHASES, TRAINING_PHASES, PipelineConfig, load_pipeline_config
from pipeline_data import (
    base_text_files,
    fit_pipeline_tokenizer,
    link_phase_files,
    make_task_files,
    phase_dataset,
    phase_files,
    task_files,
)
from pipeline_eval import EVAL_OUTPUTS, evaluate_stages
from pipeline_state import PhaseState, fingerprint, is_done, read_state, record_outputs
from phase_runner import run_logged
from report_card import REPORT, write_report_card
from run_files import checkpoints_in
from tokenizer import write_tokenizer_file
from guards import format_duration

TOKENIZER_FILE = "tokenizer.json"
LOG = "log.txt"
CONFIG_SECTIONS = ("tokenizer", "tasks", "eval", "report")  # --tasks.per_kind 100 and the like


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(description="Train a chat model from raw text through phases: "
                                   + ", ".join(PHASES) + ".", allow_abbrev=False,
                       epilog="Other flags are handed on: --PHASE.FLAG VALUE to one training phase's "
                       f"train.py ({', '.join(TRAINING_PHASES)}; e.g. --base.max_steps 100), --SECTION.FIELD "
                       f"VALUE to the pipeline config ({', '.join(CONFIG_SECTIONS)}; e.g. --tasks.per_kind 100), "
                       "and any other to every training phase's train.py (e.g. --eval_iters 10).")
    parser.add_argument("--config", required=True, help="the pipeline config (configs/pipeline_laptop.json)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--from", dest="from_phase", choices=PHASES, metavar="PHASE",
                       help="run again from this phase on (the ones before must be done)")
    where.add_argument("--only", choices=PHASES, metavar="PHASE", help="run just this phase, again")
    parser.add_argument("--dataset", help="the base text, over the config's: a file, folder or glob")
    parser.add_argument("--run_dir", help="where the phases write, over the config's")
    parser.add_argument("--device", help="cpu, cuda or mps for every phase (default: the best available)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return parser


@dataclass
class Flags:
    """The flags the pipeline hands on: to every training phase, to one, or to its own config."""
    common: list[str] = field(default_factory=list)
    per_phase: dict[str, list[str]] = field(default_factory=dict)
    config: dict[str, dict[str, str]] = field(default_factory=dict)


def split_flags(extra: list[str]) -> Flags:
    """Sort the flags argparse left over into Flags; `--a=b` and `--a b` both work."""
    flags = Flags()
    i = 0
    while i < len(extra):
        token = extra[i]
        if not token.startswith("--"):
            raise UserError(f"unexpected argument '{token}'; flags take the form --name VALUE")
        name, _, value = token[2:].partition("=")
        takes_value = "=" in token or (i + 1 < len(extra) and not extra[i + 1].startswith("--"))
        if "=" not in token and takes_value:
            value, i = extra[i + 1], i + 1
        i += 1
        head, _, rest = name.partition(".")
        if head in TRAINING_PHASES and rest:
            flags.per_phase.setdefault(head, []).extend([f"--{rest}"] + ([value] if takes_value else []))
        elif head in CONFIG_SECTIONS and rest:
            if not takes_value:
                raise UserError(f"--{name} needs a value")
            flags.config.setdefault(head, {})[rest] = value
        elif head in ("eval", "report", "tokenizer") and not rest:
            raise UserError(f"--{name} is a phase; use --only {name} or --from {name}")
        else:
            flags.common.extend([f"--{name}"] + ([value] if takes_value else []))
    return flags


class Pipeline:
    def __init__(self, cfg: PipelineConfig, flags: Flags, device: Optional[str], command: str = "pipeline.py"):
        self.cfg, self.flags, self.device = cfg, flags, device
        self.command = command  # as typed: the report and each phase.json say what ran them
        self.run_dir = Path(cfg.run_dir)
        self.base_files = base_text_files(cfg.dataset)
        self.tasks = task_files(self.folder("tokenizer"))
        self.started = time.perf_counter()

    def folder(self, phase: str) -> Path:
        return self.run_dir / phase

    def handover(self, phase: str) -> Path:
        """The checkpoint a training phase hands to the next: its best, else its latest."""
        return find_checkpoint(self.folder(phase), prefer=BEST_FIRST)

    def outputs_of(self, phase: str) -> dict:
        state = read_state(self.folder(phase))
        return state.outputs if state else {}

    # ------------------------------------------------------------ fingerprints

    def phase_files(self, phase: str) -> list[Path]:
        return phase_files(getattr(self.cfg, phase).data, self.base_files, self.tasks)

    def train_args(self, phase: str) -> list[str]:
        """train.py's flags for a phase, --resume / --overwrite / --load_model_only aside."""
        dataset = phase_dataset(self.phase_files(phase), self.folder(phase) / "data")
        args = ["--config", str(self.cfg.phase_config(phase)), "--out_dir", str(self.folder(phase)),
                "--dataset", dataset]
        if phase == "base":
            args += ["--data.tokenizer_file", str(self.folder("tokenizer") / TOKENIZER_FILE)]
        if self.device:
            args += ["--device", self.device]
        return args + self.flags.common + self.flags.per_phase.get(phase, [])

    def resolved_config(self, phase: str) -> dict:
        """The phase's whole config, as train.py will resolve it; a bad flag or file stops here,
        naming a flag of this phase alone as typed (--base.max_steps, which train.py sees as
        --max_steps)."""
        try:
            args = train.build_parser().parse_args(self.train_args(phase))
            return config_to_dict(resolve_config(args.config, overrides_from_args(args)))
        except UserError as error:
            message = str(error)
            own = [flag for flag in self.flags.per_phase.get(phase, []) if flag.startswith("--")]
            for flag in own:
                message = re.sub(rf"{re.escape(flag)}(?![\w.])", f"--{phase}.{flag[2:]}", message)
            if f"--{phase}." in message:  # the phase's own flag was wrong: so is the suggestion's form
                message = message.replace("did you mean --", f"did you mean --{phase}.")
            raise UserError(message) from None

    def expected(self, phase: str) -> str:
        """The fingerprint of what a phase would run with now: its settings and its inputs."""
        cfg = self.cfg
        base_stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in self.base_files]
        if phase == "tokenizer":
            identity = Path(cfg.tasks.identity)
            identity_stat = (identity.stat().st_size, identity.stat().st_mtime_ns) if identity.is_file() else None
            return fingerprint([asdict(cfg.tokenizer), asdict(cfg.tasks), base_stats, identity_stat])
        before = self.outputs_of(PHASES[PHASES.index(phase) - 1]) if phase != "eval" else \
            [self.outputs_of(stage) for stage in TRAINING_PHASES]
        if phase in TRAINING_PHASES:
            return fingerprint([self.resolved_config(phase), before, self.outputs_of("tokenizer")])
        if phase == "eval":
            return fingerprint([asdict(cfg.eval), before, self.outputs_of("tokenizer"), self.device])
        return fingerprint([asdict(cfg.report), before, [self.outputs_of(p) for p in TRAINING_PHASES]])

    # ------------------------------------------------------------ running phases

    def run(self, phases: list[str], forced: set[str]) -> int:
        for phase in phases:
            code = self.run_phase(phase, force=phase in forced)
            if code:
                return code
        if phases[-1] != "report":
            print(f"[pipeline] {', '.join(phases)}: done", flush=True)
            return 0
        total = sum(state.seconds for p in PHASES if (state := read_state(self.folder(p))))
        print(f"[pipeline] all phases done: {format_duration(total)} of phase time in all; "
              f"the report is {self.run_dir / REPORT}", flush=True)
        return 0

    def run_phase(self, phase: str, force: bool) -> int:
        folder, expected = self.folder(phase), self.expected(phase)
        before = read_state(folder)
        if not force and is_done(before, folder, expected):
            print(f"[pipeline] {phase}: done earlier with these settings and verified; skipped", flush=True)
            return 0
        # only an attempt with today's settings that did not finish is gone on with; other settings
        # (or --from/--only) start the phase over
        interrupted = before is not None and before.fingerprint == expected and before.status != "done"
        state = PhaseState(phase, expected, seconds=before.seconds if interrupted else 0.0, command=self.command)
        state.save(folder)
        print(f"[pipeline] {phase}: starting", flush=True)
        started = time.perf_counter()
        try:
            code, outputs = self.execute(phase, resume=interrupted and not force, forced=force)
        except Stopped as stop:  # in the pipeline's own process: the tokenizer, eval (between its children), report
            code, outputs = 128 + stop.number, []
            say_stopped(phase, code, self.folder(phase) / LOG, force)
        state.seconds += time.perf_counter() - started
        state.status = "stopped" if code else "done"
        if not code:
            state.outputs = record_outputs(folder, outputs)
        state.save(folder)
        if not code:
            print(f"[pipeline] {phase}: done in {format_duration(state.seconds)}", flush=True)
        return code

    def execute(self, phase: str, resume: bool, forced: bool) -> tuple[int, list[str]]:
        """Run one phase; return its exit status and its outputs' names (in its folder). `resume`:
        a training phase goes on from its newest checkpoint; `forced`: --from or --only chose it."""
        folder = self.folder(phase)
        if phase == "tokenizer":
            return 0, self.make_tokenizer()
        if phase in TRAINING_PHASES:
            return self.train_phase(phase, resume, forced)
        if phase == "eval":
            return evaluate_stages(self, folder / LOG), list(EVAL_OUTPUTS)
        write_report_card(self)
        return 0, [f"../{REPORT}"]

    def make_tokenizer(self) -> list[str]:
        tasks = make_task_files(self.cfg.tasks, self.base_files, self.folder("tokenizer"))
        tokenizer = fit_pipeline_tokenizer(self.cfg.tokenizer, self.base_files, tasks)
        write_tokenizer_file(tokenizer, self.folder("tokenizer") / TOKENIZER_FILE)
        what = "needs no fitting" if self.cfg.tokenizer.kind == "tiktoken" else "fitted to the base text and tasks"
        print(f"[pipeline] tokenizer: {tokenizer.kind}, {tokenizer.vocab_size:,} ids ({what}); task chats "
              f"in {self.tasks.train.parent}", flush=True)
        return [TOKENIZER_FILE, self.tasks.train.name, self.tasks.held_out.name, self.tasks.choices.name]

    def train_phase(self, phase: str, resume: bool, forced: bool) -> tuple[int, list[str]]:
        folder = self.folder(phase)
        link_phase_files(self.phase_files(phase), folder / "data")
        args = self.train_args(phase)
        if resume and checkpoints_in(folder):
            args.append("--resume")  # interrupted with these settings: go on from its newest valid checkpoint
            print(f"[pipeline] {phase}: resuming from its newest valid checkpoint in {folder}", flush=True)
        else:
            if checkpoints_in(folder):
                args.append("--overwrite")
            if phase != "base":
                args += ["--load_model_only", str(self.handover(PHASES[PHASES.index(phase) - 1]))]
        command = [sys.executable, str(Path(train.__file__).resolve()), *args]
        code = run_logged(command, folder / LOG)
        if code:
            say_stopped(phase, code, folder / LOG, forced)
            return code, []
        checkpoint = load_checkpoint(folder / "ckpt.pt")
        if checkpoint["step"] < checkpoint.get("max_steps", checkpoint["step"]):
            print(f"[pipeline] {phase} stopped at step {checkpoint['step']} of {checkpoint['max_steps']} (its time "
                  "limit); run the same command again to go on", file=sys.stderr, flush=True)
            return 1, []
        return 0, [self.handover(phase).name]


class Stopped(Exception):
    """SIGINT or SIGTERM, while the pipeline itself works (a training phase's child hears it instead)."""

    def __init__(self, number: int):
        super().__init__(signal.Signals(number).name)
        self.number = number


def raise_stopped(number: int, _frame: object) -> None:
    raise Stopped(number)


def say_stopped(phase: str, code: int, log: Path, forced: bool) -> None:
    """The line a phase that failed or was stopped ends with: what, where its log is, how to go on."""
    why = f"stopped by a signal (exit {code})" if code > 128 else f"failed (exit {code})"
    again = ("run the command again without --from/--only (with them the phase starts over)" if forced
             else "run the same command again")
    then = "resume it from its newest checkpoint" if phase in TRAINING_PHASES else "run it again"
    print(f"[pipeline] {phase} {why}; its log is {log}; {again} to {then}", file=sys.stderr, flush=True)


def selected_phases(args: argparse.Namespace) -> tuple[list[str], set[str]]:
    """The phases to run and those to run again even if done."""
    if args.only:
        return [args.only], {args.only}
    if args.from_phase:
        chosen = list(PHASES[PHASES.index(args.from_phase):])
        return chosen, set(chosen)
    return list(PHASES), set()


def check_earlier_done(pipeline: Pipeline, first: str) -> None:
    """--from and --only need every phase before theirs done, with today's settings."""
    for phase in PHASES[:PHASES.index(first)]:
        if not is_done(read_state(pipeline.folder(phase)), pipeline.folder(phase), pipeline.expected(phase)):
            raise UserError(f"phase {phase} is not done with these settings, and {first} needs it; run the "
                            f"pipeline without --from/--only first (it skips what is done)")


def main(argv: Sequence[str]) -> int:
    args, extra = build_parser().parse_known_args(argv)
    flags = split_flags(extra)
    cfg = load_pipeline_config(args.config, flags.config)
    if args.dataset:
        cfg.dataset = args.dataset
    if args.run_dir:
        cfg.run_dir = args.run_dir
    pipeline = Pipeline(cfg, flags, args.device, shlex.join(["pipeline.py", *argv]))
    phases, forced = selected_phases(args)
    for phase in TRAINING_PHASES:
        pipeline.resolved_config(phase)  # every phase's config and flags checked before anything runs
    if forced:
        check_earlier_done(pipeline, phases[0])
    print(f"[pipeline] {args.config}: phases {', '.join(phases)}; writing to {pipeline.run_dir}", flush=True)
    previous = {number: signal.signal(number, raise_stopped) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        return pipeline.run(phases, forced)
    except Stopped as stop:  # between phases: nothing was under way
        print(f"[pipeline] stopped by {stop} between phases; run the same command again to go on",
              file=sys.stderr, flush=True)
        return 128 + stop.number
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


if __name__ == "__main__":
    sys.exit(run_cli(main))
