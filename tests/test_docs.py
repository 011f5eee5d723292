"""Every command in a ```bash block of README.md and docs/ runs, and every relative link resolves.

The commands run in this process (one torch import for all of them), each page in a copy of
the repository of its own, as a reader who starts there would: the short ones for real, the
training ones shrunk to a few steps of a one-layer model (the GPU-sized configs with
`--show_config`), `../shared/data/tinyshakespeare.txt` and the download replaced by a small
corpus. A page that builds on another (`STARTS_FROM`) starts from a copy of that page's folder,
so each model is trained once. A command of a kind no rule knows fails, so a new doc command
cannot go untested; one that cannot run here needs an excuse, and an excuse that matches no
command fails too.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import pytest

import bench
import check_model
import eval as eval_cli
import export
import gen
import gpu_check
import plot
import tasks
import train
from cli import run_cli
from tests.conftest import REPO_ROOT, generated_corpus
from tests.doc_commands import DocCommand, bash_blocks, block_commands, page_commands, printed

DOC_PAGES = (REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").rglob("*.md")))
SHARED_TEXT = "../shared/data/tinyshakespeare.txt"
CORPUS_CHARS = 200_000  # enough for a 2,048-id SentencePiece model, small enough to tokenize at once

# The page whose finished folder a page starts from (its "you need a trained model" line).
FIRST_MODEL = "docs/tutorials/first-model-on-a-laptop.md"
CHAT_MODEL = "docs/how-to/chat-finetune-by-hand.md"
STARTS_FROM = {
    "docs/how-to/generate-and-chat.md": (FIRST_MODEL, CHAT_MODEL),
    "docs/how-to/measure-a-model.md": (FIRST_MODEL, CHAT_MODEL),
    "docs/how-to/hugging-face.md": (FIRST_MODEL,),
    "docs/how-to/resume-and-fine-tune.md": (FIRST_MODEL,),
    "docs/how-to/watch-a-run.md": (FIRST_MODEL,),
}

PINNED = ["--device", "cpu", "--system.dtype", "float32"]  # auto differs between CPUs
FEW_STEPS = ["--max_steps", "2", "--eval_interval", "2", "--eval_iters", "1", "--training.eval_train_iters", "1",
             "--training.eval_full_val", "false", "--log_interval", "1", "--training.warmup_steps", "1"]
ONE_LAYER = ["--model.n_layer", "1", "--model.n_head", "2", "--model.n_embd", "32", "--batch_size", "2",
             "--training.grad_accum_steps", "1"]
GPU_CONFIGS = ("configs/shakespeare_char.json", "configs/shakespeare_char_speedrun.json", "configs/gpt2_124m.json")
ANSWERS_WITHOUT_TRAINING = ("--show_config", "--save_config", "--data_stats", "--version")


@dataclass(frozen=True)
class Excuse:
    """A command that cannot run here, why, and what stands in for its output (if anything)."""
    pattern: str  # searched in the command's text
    reason: str
    stand_in: Callable[[DocCommand, Path], None] | None = None


def parquet_shard_stand_in(command: DocCommand, work: Path) -> None:
    """Write a small shard where `hf download --local-dir DIR` would put the real ones."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    folder = work / command.words[command.words.index("--local-dir") + 1]
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": generated_corpus(20_000).split("\n\n")}), folder / "shard.parquet")


EXCUSES = (
    Excuse(r"^pip install", "installs from the network; the environment running this test is that install"),
    Excuse(r"^python -m pytest", "the test suite, which runs this file (.ci/run runs it)"),
    Excuse(r"^hf download", "downloads from the Hugging Face Hub; a small parquet shard stands in",
           parquet_shard_stand_in),
    Excuse(r"--push_to_hub(?!.*--dry_run)", "uploads: needs a Hub token and the network (the --dry_run form runs)"),
    Excuse(r"^torchrun --standalone --nproc_per_node 8", "needs 8 GPUs"),
    Excuse(r"^torchrun --nnodes 2", "needs two nodes with 8 GPUs each"),
    Excuse(r"^sbatch", "needs a SLURM cluster"),
    Excuse(r"--data\.tokenizer tiktoken", "tiktoken downloads its encoding's files on first use; no network here"),
    Excuse(r"--max_batch|--at_max_batch", "searches the largest micro-batch that fits a GPU's memory"),
    Excuse(r"^python pipeline\.py", "five child processes, minutes on 2 cores: tests/test_pipeline.py runs the "
           "pipeline end to end"),
    Excuse(r"^tensorboard --logdir", "starts TensorBoard's web server; the EventAccumulator command beside it "
           "reads the same events"),
    Excuse(r"^wandb sync (?!--dry-run)", "uploads to W&B: needs an account and the network (--dry-run runs)"),
    Excuse(r"^python serve\.py", "starts a web server that runs until stopped: tests/test_serve.py runs it live "
           "and answers it with the openai client and a headless browser"),
    Excuse(r"models/pipeline_laptop/", "needs the pipeline's models, from the command excused above"),
)


ALL_COMMANDS = [command for page in DOC_PAGES for command in page_commands(page, REPO_ROOT)]


def excuse_for(command: DocCommand) -> Excuse | None:
    return next((excuse for excuse in EXCUSES if re.search(excuse.pattern, command.text)), None)


# --- running them ----------------------------------------------------------------------------

@dataclass
class Workplace:
    """A page's folder and the small corpus that replaces Tiny Shakespeare there."""
    folder: Path
    corpus: Path

    def words(self, words: Sequence[str]) -> list[str]:
        return [word.replace(SHARED_TEXT, str(self.corpus)) for word in words]


class Terminal(io.StringIO):
    """Stdin as a terminal with nothing typed: Ctrl+D at once."""

    def isatty(self) -> bool:
        return True


def call_main(main: Callable[[Sequence[str]], int], argv: Sequence[str], command: DocCommand) -> tuple[int, str]:
    """Run a command's main in this process; return its exit status and everything it printed."""
    output, stdin_before = io.StringIO(), sys.stdin
    sys.stdin = io.StringIO(command.stdin) if command.stdin is not None else Terminal()
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            status = run_cli(main, list(argv))
    except SystemExit as stop:  # --version, --help
        status = stop.code if isinstance(stop.code, int) else 0
    finally:
        sys.stdin = stdin_before
    return status, output.getvalue()


def config_of(argv: Sequence[str]) -> str:
    return argv[argv.index("--config") + 1] if "--config" in argv else ""


def train_argv(argv: list[str]) -> list[str]:
    """The command's flags, shrunk: a few steps of a one-layer model, or just the resolved config."""
    if any(flag in argv for flag in ANSWERS_WITHOUT_TRAINING):
        return argv + PINNED
    if config_of(argv) in GPU_CONFIGS:
        return argv + PINNED + ["--show_config"]
    if "--resume" in argv:  # a few steps further; a --config must say the checkpoint's shape
        return argv + PINNED + FEW_STEPS[2:] + ["--max_steps", "4"] + (ONE_LAYER if "--config" in argv else [])
    return argv + PINNED + FEW_STEPS + ONE_LAYER


def run_train(command: DocCommand, place: Workplace) -> tuple[int, str]:
    return call_main(train.main, train_argv(place.words(command.words[2:])), command)


def run_bench(command: DocCommand, place: Workplace) -> tuple[int, str]:
    argv = place.words(command.words[2:]) + ["--steps", "2", "--model.block_size", "64"]
    return call_main(bench.main, argv + PINNED + FEW_STEPS[2:] + ONE_LAYER, command)


def with_args(main: Callable[[Sequence[str]], int], *extra: str) -> Callable[[DocCommand, Workplace], tuple[int, str]]:
    """A rule that runs `main` with the command's own arguments and `extra` after them."""
    return lambda command, place: call_main(main, place.words(command.words[2:]) + list(extra), command)


def run_gpu_check(command: DocCommand, place: Workplace) -> tuple[int, str]:
    """The GPU check's items for these flags, listed (`--list`): the flags and item names hold."""
    return call_main(gpu_check.main, place.words(command.words[1:]) + ["--list"], command)


def run_python_code(command: DocCommand, place: Workplace) -> tuple[int, str]:
    """`python -c CODE` or `python - <<'PY'`: the code, run here."""
    code = command.words[2] if command.words[1] == "-c" else command.heredoc or ""
    code = place.words([code])[0]

    def main(argv: Sequence[str]) -> int:
        exec(compile(code, command.where(), "exec"), {"__name__": "__main__"})
        return 0
    return call_main(main, [], command)


def run_reference(command: DocCommand, place: Workplace) -> tuple[int, str]:
    """`python reference.py` would rewrite the reference pages: check that they are current instead."""
    done = subprocess.run([sys.executable, "reference.py", "--check"], cwd=REPO_ROOT, capture_output=True, text=True)
    return done.returncode, done.stdout + done.stderr


def run_torchrun(command: DocCommand, place: Workplace) -> tuple[int, str]:
    """One node of CPU processes, each a few steps of the one-layer model."""
    argv = [sys.executable, "-m", "torch.distributed.run", *place.words(command.words[1:])]
    env = {**os.environ, **dict(command.env)}
    done = subprocess.run(argv + PINNED + FEW_STEPS + ONE_LAYER, cwd=place.folder, env=env, capture_output=True,
                          text=True, timeout=120)
    return done.returncode, done.stdout + done.stderr


def run_file_command(command: DocCommand, place: Workplace) -> tuple[int, str]:
    """cp, mkdir -p and `echo TEXT > FILE`, as the shell does them."""
    words = place.words(command.words)
    if words[0] == "cp":
        shutil.copy(words[1], words[2])
    elif words[0] == "mkdir":
        for folder in words[2:]:
            Path(folder).mkdir(parents=True, exist_ok=True)
    elif command.redirect is not None:
        Path(command.redirect).write_text(printed(words))
    else:
        return 127, "only `echo TEXT > FILE` or `echo TEXT | COMMAND` are known"
    return 0, ""


def run_wandb_dry_run(command: DocCommand, place: Workplace) -> tuple[int, str]:
    """`wandb sync --dry-run DIR...`, the shell's glob expanded: it lists the offline runs, uploads nothing."""
    paths = [str(path) for word in command.words[3:] for path in sorted(place.folder.glob(word))]
    wandb = Path(sys.executable).with_name("wandb")
    result = subprocess.run([str(wandb), "sync", "--dry-run", *paths], cwd=place.folder, capture_output=True,
                            text=True, env={**os.environ, "HOME": str(place.folder), "WANDB_MODE": "offline"})
    return (result.returncode if paths else 1), result.stdout + result.stderr


def skeleton_exit_status(command: DocCommand, place: Workplace) -> int:
    """check_model.py fails (1) on the untouched skeleton, as the tutorial says it does."""
    target = Path(command.words[2].split(":")[0])
    skeleton = REPO_ROOT / "examples" / "my_gpt_skeleton.py"
    return 1 if target.is_file() and target.read_bytes() == skeleton.read_bytes() else 0


@dataclass(frozen=True)
class Rule:
    """How to run the commands that start with `program`, and the exit status they should give."""
    program: tuple[str, ...]
    run: Callable[[DocCommand, Workplace], tuple[int, str]]
    expected: Callable[[DocCommand, Workplace], int] = lambda command, place: 0


RULES = (
    Rule(("python", "train.py"), run_train),
    Rule(("python", "gen.py"), with_args(gen.main, "--max_new_tokens", "8")),
    Rule(("python", "eval.py"), with_args(eval_cli.main)),
    Rule(("python", "export.py"), with_args(export.main)),
    Rule(("python", "plot.py"), with_args(plot.main)),
    Rule(("python", "bench.py"), run_bench),
    Rule(("python", "check_model.py"), with_args(check_model.main), skeleton_exit_status),
    Rule(("python", "tasks.py"), with_args(tasks.main, "--per_kind", "100", "--held_out", "20")),  # fewer chats
    Rule(("python", "reference.py"), run_reference),
    Rule(("python", "-c"), run_python_code),
    Rule(("python", "-"), run_python_code),
    Rule(("torchrun", "--standalone"), run_torchrun),
    Rule(("scripts/gpu_check.sh",), run_gpu_check),
    Rule(("wandb", "sync", "--dry-run"), run_wandb_dry_run),
    Rule(("cp",), run_file_command),
    Rule(("mkdir", "-p"), run_file_command),
    Rule(("echo",), run_file_command),
)


def rule_for(command: DocCommand) -> Rule | None:
    return next((rule for rule in RULES if command.words[: len(rule.program)] == rule.program), None)


def run_command(command: DocCommand, place: Workplace) -> str | None:
    """Run one command in its page's folder; return why it failed, or None."""
    if (excuse := excuse_for(command)) is not None:
        if excuse.stand_in is not None:
            excuse.stand_in(command, place.folder)
        return None
    if (rule := rule_for(command)) is None:
        return f"{command.where()}\n  no rule runs it: add one to RULES, or an excuse to EXCUSES"
    before = Path.cwd()
    os.chdir(place.folder)
    try:
        status, output = rule.run(command, place)
        expected = rule.expected(command, place)
    finally:
        os.chdir(before)
    if status == expected:
        return None
    return f"{command.where()}\n  exit status {status}, expected {expected}; its output ends:\n{output[-1500:]}"


REPOSITORY_DIRS = ("configs", "examples", "scripts")


def repository_copy(folder: Path, cache: Path) -> None:
    """What a reader's clone holds: the root's files, configs, examples, scripts, data's files."""
    folder.mkdir(parents=True)
    for entry in REPO_ROOT.iterdir():
        if entry.is_file() and entry.suffix in (".py", ".json", ".md", ".txt", ".ini"):
            shutil.copy(entry, folder / entry.name)
    for name in REPOSITORY_DIRS:
        shutil.copytree(REPO_ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "data").mkdir()
    for entry in (REPO_ROOT / "data").iterdir():
        if entry.is_file():
            shutil.copy(entry, folder / "data" / entry.name)
    (folder / "cache").symlink_to(cache, target_is_directory=True)


def page_order() -> list[str]:
    """Every page with commands, each after the pages it starts from."""
    order: list[str] = []

    def visit(page: str) -> None:
        for base in STARTS_FROM.get(page, ()):
            visit(base)
        if page not in order:
            order.append(page)
    for command in ALL_COMMANDS:
        visit(command.page)
    return order


@pytest.fixture(scope="module")
def doc_failures(tmp_path_factory, corpus_file) -> dict[str, list[str]]:
    """Run every page's commands once, in page order; return each page's failures."""
    root = tmp_path_factory.mktemp("docs")
    corpus = root / "corpus.txt"
    corpus.write_text(corpus_file.read_text()[:CORPUS_CHARS])
    cache = root / "cache"
    (cache / "shakespeare_char").mkdir(parents=True)
    shutil.copy(corpus, cache / "shakespeare_char" / "input.txt")  # what the download would bring
    failures: dict[str, list[str]] = {}
    for page in page_order():
        folder = root / page.replace("/", "_")
        repository_copy(folder, cache)
        for base in STARTS_FROM.get(page, ()):
            shutil.copytree(root / base.replace("/", "_"), folder, symlinks=True, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("cache"))
        place = Workplace(folder, corpus)
        failures[page] = [failure for command in ALL_COMMANDS if command.page == page
                          if (failure := run_command(command, place)) is not None]
    return failures


def test_every_doc_command_has_a_rule_or_an_excuse():
    unknown = [command.where() for command in ALL_COMMANDS if rule_for(command) is None and excuse_for(command) is None]
    assert not unknown, "commands no rule runs (add a rule or an excuse):\n" + "\n".join(unknown)


def test_every_excuse_still_matches_a_command():
    stale = [excuse.pattern for excuse in EXCUSES
             if not any(re.search(excuse.pattern, command.text) for command in ALL_COMMANDS)]
    assert not stale, f"excuses that match no command in the docs any more: {stale}"


@pytest.mark.parametrize("page", sorted({command.page for command in ALL_COMMANDS}))
def test_the_commands_of_a_page_run(page, doc_failures):
    assert not doc_failures[page], "\n\n".join(doc_failures[page])


LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_relative_links_resolve():
    broken = []
    for page in DOC_PAGES:
        for target in LINK.findall(page.read_text()):
            path = target.split("#")[0]
            if not path or re.match(r"^[a-z]+:", path):
                continue
            resolved = (page.parent / path).resolve()
            if not resolved.exists():
                broken.append(f"{page.relative_to(REPO_ROOT)}: {target}")
    assert not broken, "links to nothing:\n" + "\n".join(broken)


def test_the_command_reader_joins_pipes_heredocs_and_continuations():
    text = ("```bash\nprintf \"a\\nb\\n\" | python gen.py m --chat  # two\nOMP_NUM_THREADS=1 torchrun --standalone \\\n"
            "    train.py --x 1\nmkdir -p d && python - <<'PY'\nprint(1)\nPY\necho \"hi\" > f.txt\n```\n")
    commands = list(block_commands("p", *next(bash_blocks(text))))
    assert [command.words for command in commands] == [
        ("python", "gen.py", "m", "--chat"), ("torchrun", "--standalone", "train.py", "--x", "1"),
        ("mkdir", "-p", "d"), ("python", "-"), ("echo", "hi")]
    assert commands[0].stdin == "a\nb\n" and commands[1].env == (("OMP_NUM_THREADS", "1"),)
    assert commands[2].heredoc is None and commands[3].heredoc == "print(1)\n"
    assert commands[4].redirect == "f.txt" and [command.line for command in commands] == [2, 3, 5, 5, 8]
