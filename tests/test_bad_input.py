"""Every mistake a user can make ends in one clear line, exit status 2, and no file changed."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import checkpoint
import eval as eval_cli
import gen
import plot
import train
from cli import run_cli
from tests.conftest import REPO_ROOT, TINY_SETTINGS

CONFIG = "tiny_test.json"
MODELS = """
import torch
from torch import nn


class Base(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embedding = nn.Embedding(config.vocab_size, config.vocab_size)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None):
        logits = self.embedding(idx)
        if targets is None:
            return logits, None
        return logits, nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


class NoForward(nn.Module):
    def num_params(self):
        return 0


class NotAModule:
    pass


class JustLogits(Base):
    def forward(self, idx, targets=None):
        return super().forward(idx, targets)[0]


class LastPosition(Base):
    def forward(self, idx, targets=None):
        logits, loss = super().forward(idx, targets)
        return logits[:, -1], loss


class NoLoss(Base):
    def forward(self, idx, targets=None):
        return super().forward(idx)


class BareWithoutTargets(Base):
    def forward(self, idx, targets=None):
        logits, loss = super().forward(idx, targets)
        return (logits, loss) if targets is not None else logits


class Crashes(Base):
    def forward(self, idx, targets=None):
        return self.embedding(idx) @ torch.ones(3, 3), None
"""
CKPT = "models/tiny_test/ckpt.pt"
SKELETON = f"{REPO_ROOT / 'examples/my_gpt_skeleton.py'}:MyGPT"
MY_GPT = f"{REPO_ROOT / 'examples/my_gpt.py'}:MyGPT"


class Evil:
    """Unpickling this would create a file; a safe loader must refuse it."""

    def __reduce__(self):
        return (open, ("bad/PWNED", "w"))


def parquet_file(columns: dict) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink)
    return sink.getvalue().to_pybytes()


def bad_files(corpus: Path) -> dict[str, bytes]:
    good = (Path("models/tiny_test/ckpt.pt")).read_bytes()
    return {
        "broken.json": b'{"model": {"n_layer": 4,}}',
        "list.json": b"[1, 2]",
        "typo_key.json": json.dumps({"training": {"learning_rate": 0.1}}).encode(),
        "typo_section.json": json.dumps({"trainig": {"lr": 0.1}}).encode(),
        "wrong_type.json": json.dumps({"training": {"lr": "fast"}}).encode(),
        "cycle_a.json": json.dumps({"extends": "cycle_b.json"}).encode(),
        "cycle_b.json": json.dumps({"extends": "cycle_a.json"}).encode(),
        "orphan.json": json.dumps({"extends": "missing_parent.json"}).encode(),
        "heads.json": json.dumps({"extends": f"../{CONFIG}", "model": {"n_head": 3}}).encode(),
        "empty.txt": b"",
        "short.txt": b"To be, or not to be." * 3,
        "latin1.txt": "Ça va très bien, merci".encode("latin-1") * 20,
        "truncated.pt": good[: len(good) // 3],
        "empty.pt": b"",
        "random.pt": os.urandom(4096),
        "a_file": b"",
        "chats.jsonl": (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", '
                        b'"content": "hello"}]}\n{"messages": [}\n'),
        "no_reply.jsonl": b'{"text": "fine"}\n{"messages": [{"role": "user", "content": "hi"}]}\n',
        "roles.jsonl": b'{"messages": [{"role": "narrator", "content": "Once"}]}\n',
        "pages.parquet": parquet_file({"page": ["To be, or not to be"], "id": [7]}),
        "no_reply.parquet": parquet_file({"messages": [[{"role": "user", "content": "hi"}]]}),
        "notes/empty.md": b"",
        "unknown_chars.txt": "ROMEO: ☃ snow".encode(),
        "no_text/readme.rst": b"not a source",
        "models.py": MODELS.encode(),
        "syntax.py": b"class MyGPT(nn.Module:\n",
    }


@pytest.fixture(scope="module")
def trained_template(tmp_path_factory, small_corpus_file) -> Path:
    """A folder holding a config, a finished tiny run and the bad files, made once."""
    root = tmp_path_factory.mktemp("template")
    settings = json.loads(json.dumps(TINY_SETTINGS))
    settings["data"] = {"dataset": str(small_corpus_file)}
    (root / CONFIG).write_text(json.dumps(settings))
    cwd = Path.cwd()
    os.chdir(root)
    try:
        assert train.main(["--config", CONFIG]) == 0
        (root / "bad").mkdir()
        for name, content in bad_files(small_corpus_file).items():
            (root / "bad" / name).parent.mkdir(parents=True, exist_ok=True)
            (root / "bad" / name).write_bytes(content)
        torch.save({"format": "someone else's", "weights": torch.zeros(3)}, root / "bad/foreign.pt")
        torch.save({"format": checkpoint.FORMAT, "payload": Evil()}, root / "bad/evil.pt")
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def user_dir(trained_template, workdir) -> Path:
    shutil.copytree(trained_template, workdir, dirs_exist_ok=True)
    return workdir


def fingerprints(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "cache" not in p.parts}


T = ["--config", CONFIG]  # most train.py cases start from the good config
I = [*T, "--out_dir", "m", "--model_impl"]  # noqa: E741 (then a model class of the user's)
CASES = [
    # config files
    ("train", ["--config", "nope.json"], f"config file .*nope.json does not exist; the shipped ones are in "
                                         f"{re.escape(str(REPO_ROOT / 'configs'))}/$"),  # not the user's folder
    ("train", ["--config", "bad/broken.json"], "is not valid JSON"),
    ("train", ["--config", "bad/list.json"], "must hold a JSON object"),
    ("train", ["--config", "bad/typo_key.json"], "unknown key 'training.learning_rate'"),
    ("train", ["--config", "bad/typo_section.json"], "did you mean 'training'"),
    ("train", ["--config", "bad/wrong_type.json"], "training.lr must be a number"),
    ("train", ["--config", "bad/cycle_a.json"], "extend each other in a cycle"),
    ("train", ["--config", "bad/orphan.json"], "missing_parent.json does not exist; 'extends' in .*orphan.json names it"),
    ("train", ["--config", "bad/heads.json"], "must be divisible by model.n_head"),
    # flag values
    ("train", [*T, "--lr", "-1"], "training.lr must be positive"),
    ("train", [*T, "--lr", "fast"], r"--lr \(--training.lr\) expects a number, got 'fast'"),  # either was typed
    ("train", [*T, "--max_steps", "2.5"], "expects a whole number"),
    ("train", [*T, "--lrr", "0.1"], "unknown flag --lrr; did you mean --lr"),
    ("train", [*T, "--device", "tpu"], "system.device must be one of"),
    ("train", [*T, "--model.n_kv_head", "3"], r"model.n_kv_head \(3\) must divide model.n_head"),
    ("train", [*T, "--system.compile_mode", "fast"], "system.compile_mode must be one of"),
    ("train", [*T, "--out_dir", "x", "--system.attention_backend", "cudnn"],
     "system.attention_backend cudnn is a CUDA kernel; on cpu torch has math and flash"),
    ("train", [*T, "--out_dir", "x", "--system.attention_backend", "flash", "--model.dropout", "0.1"],
     "flash cannot run this model's attention on cpu in float32: .*dropout; use auto"),
    ("train", [*T, "--out_dir", "x", "--system.attention_backend", "math", "--model.flash_attention", "false"],
     "model.flash_attention false does not call"),
    ("train", [*T, "--resume", "--model.n_kv_head", "1"], "it has model.n_kv_head=None"),
    ("train", [*T, "--budget", "5"], "set system.usd_per_hour"),
    ("train", [*T, "--max_time", "soon"], r"expects seconds \(5400\) or .* \(1h30m, 90m, 1.5h"),
    ("train", [*T, "--max_time", "1h30"], r"expects seconds \(5400\) or .*got .1h30."),
    ("train", [*T, "--model.vocab_size", "10", "--out_dir", "v"], "smaller than the tokenizer's"),
    ("train", [*T, "--resume", "--load_model_only", CKPT], "exclude each other"),
    # data
    ("train", [*T, "--dataset", "shakspeare"], "unknown dataset 'shakspeare'"),
    ("train", [*T, "--dataset", "bad/empty.txt", "--out_dir", "x"], "is empty"),
    ("train", [*T, "--dataset", "bad/short.txt", "--out_dir", "x"], "fewer than block_size"),
    ("train", [*T, "--dataset", "bad/latin1.txt", "--out_dir", "x"], "is not UTF-8 text"),
    ("train", [*T, "--dataset", "bad/chats.jsonl", "--out_dir", "x"], "chats.jsonl line 2 is not valid JSON"),
    ("train", [*T, "--dataset", "bad/roles.jsonl", "--out_dir", "x"], r"role \"narrator\" is not one of"),
    ("train", [*T, "--dataset", "bad/no_reply.jsonl", "--out_dir", "x"],
     "no_reply.jsonl line 2 has no assistant turn: nothing to train on"),
    ("train", [*T, "--dataset", "bad/pages.parquet", "--out_dir", "x"],
     r"pages.parquet has no column 'text' or 'messages' \(it has page, id\); name yours with --data.text_co"),
    ("train", [*T, "--dataset", "bad/pages.parquet", "--data.text_column", "id", "--out_dir", "x"],
     "pages.parquet: column 'id' holds int64, not strings; name the text column with --data.text_column"),
    ("train", [*T, "--dataset", "bad/no_reply.parquet", "--out_dir", "x"], "row 0 has no assistant turn"),
    ("train", [*T, "--dataset", "bad/notes", "--out_dir", "x"], "empty.md is empty"),
    ("train", [*T, "--dataset", "bad/no_text", "--out_dir", "x"], "holds no .txt/.md/.jsonl/.parquet files"),
    ("train", [*T, "--out_dir", "x", "--data.tokenizer", "sentencepiece", "--data.vocab_size", "100000"],
     r"cannot train a vocabulary of 100000 on this text: it supports at most \d+"),
    ("train", [*T, "--out_dir", "x", "--data.tokenizer", "bpe"], "data.tokenizer must be one of char, "),
    # checkpoints and directories
    ("train", ["--config", CONFIG, "--out_dir", "models/empty_run", "--resume"], "nothing to resume"),
    ("train", [*T, "--resume", "bad/truncated.pt"], "is corrupt or not a checkpoint"),
    ("train", [*T, "--resume", "bad/empty.pt"], "is corrupt or not a checkpoint"),
    ("train", [*T, "--resume", "bad/random.pt"], "is corrupt or not a checkpoint"),
    ("train", [*T, "--resume", "bad/foreign.pt"], "not a checkpoint written by this trainer"),
    ("train", [*T, "--resume", "bad/evil.pt"], "is corrupt or not a checkpoint"),
    ("train", [*T, "--resume", "--model.n_layer", "3"], "another architecture: it has model.n_layer=2"),
    ("train", [*T, "--resume", "--model.position", "rope"], "it has model.position=learned but the config"),
    ("train", [*T, "--resume", "--model.tie_embeddings", "false"], "it has model.tie_embeddings=True"),
    ("train", [*T, "--resume", "--dataset", CONFIG], "the character '{' is not in this model's vocabulary"),
    ("train", T, "already holds a checkpoint of an earlier run"),
    ("train", [*T, "--out_dir", "bad/a_file/run"], "cannot write to out_dir"),
    ("train", [*T, "--save_config", CONFIG], f"--save_config {CONFIG} exists; name a new file, or pass --overwrite"),
    ("train", [*T, "--save_config", "bad", "--overwrite"], "--save_config bad is a folder; name a file such as"),
    ("plot", ["models/tiny_test", "--out", "models/tiny_test/ckpt.pt"], "does not end in .png; the plot is a PNG"),
    ("train", [*T, "--load_model_only", "models/none.pt", "--out_dir", "y"], "does not exist"),
    # a model class of the user's (model.impl)
    ("train", [*I, "bad/none.py:MyGPT"], "bad/none.py does not exist"),
    ("train", [*I, "bad/models.py"], "must look like path/to/my_gpt.py:MyGPT"),
    ("train", [*I, "bad/models.py:MyGPT"], "has no class MyGPT; it defines Base"),
    ("train", [*I, "bad/short.txt:MyGPT"], "short.txt is not a Python file"),
    ("train", [*I, "bad/syntax.py:MyGPT"], "importing .*syntax.py failed: Syn"),
    ("train", [*I, "bad/models.py:NotAModule"], "must subclass torch.nn.Module"),
    ("train", [*I, "bad/models.py:NoForward"], r"has no method forward\(\)"),
    ("train", [*I, "bad/models.py:JustLogits"], r"must return a tuple \(logits, loss"),
    ("train", [*I, "bad/models.py:LastPosition"], r"logits of shape .* got \(1, 64\)"),
    ("train", [*I, "bad/models.py:NoLoss"], "the loss as a scalar tensor, got None"),
    ("train", [*I, "bad/models.py:BareWithoutTargets"],  # trained, then gen.py failed with a traceback
     r"forward\(idx\) without targets must return a tuple \(logits, None\) too, got Tensor"),
    ("train", [*I, "bad/models.py:Crashes"], "forward.* failed on a batch .* RuntimeE"),
    ("train", [*I, SKELETON], "MyGPT is not finished: step 1, MyGPT.__init__"),
    ("train", [*T, "--resume", "--model_impl", MY_GPT], "do not fit MyGPT: they lack token_embedding"),
    ("gen", [CKPT, "--model_impl", "bad/none.py:MyGPT"], "cannot build the model .*bad/none.py does not"),
    ("eval", [CKPT, "--model_impl", MY_GPT], "the weights in .* do not fit MyGPT"),
    # gen.py
    ("gen", ["models/none.pt"], "checkpoint models/none.pt does not exist"),
    ("gen", ["bad"], r"no checkpoint \(best.pt or ckpt.pt\) in bad"),
    ("gen", ["bad/truncated.pt"], "is corrupt or not a checkpoint"),
    ("gen", ["bad/random.pt"], "is corrupt or not a checkpoint"),
    ("gen", ["bad/evil.pt"], "is corrupt or not a checkpoint"),
    ("eval", ["models/none.pt"], "checkpoint models/none.pt does not exist"),
    ("eval", ["bad/truncated.pt"], "is corrupt or not a checkpoint"),
    ("eval", [CKPT, "--text", "missing.txt"], "--text missing.txt does not exist"),
    ("eval", [CKPT, "--text", "bad/latin1.txt"], "is not UTF-8 text"),
    ("eval", [CKPT, "--text", "bad/empty.txt"], "fewer than 2 tokens"),
    ("eval", [CKPT, "--batch_size", "0"], "--batch_size must be at least 1"),
    ("eval", [CKPT, "--text", "bad/unknown_chars.txt"], "the character .☃. is not in this model"),
    ("gen", ["bad/foreign.pt"], "not a checkpoint written by this trainer"),
    ("gen", [CKPT, "--prompt", "ü"], "'ü' is not in this model's vocabulary"),
    ("gen", [CKPT, "--prompt", ""], "--prompt is empty"),
    ("gen", [CKPT, "--temperature", "-1"], "--temperature must be zero or more"),
    ("gen", [CKPT, "--num_samples", "0"], "--num_samples must be at least 1"),
    ("gen", [CKPT, "--max_new_tokens", "0"], "--max_new_tokens must be at least 1"),
    ("gen", [CKPT, "--top_k", "-1"], r"--top_k must be zero \(off\) or more"),
    ("gen", [CKPT, "--top_p", "0"], r"--top_p must be in \(0, 1\]"),
    ("gen", [CKPT, "--top_p", "1.5"], r"--top_p must be in \(0, 1\]"),
    ("gen", [CKPT, "--min_p", "1"], r"--min_p must be in \[0, 1\)"),
    ("gen", [CKPT, "--repetition_penalty", "0"], "--repetition_penalty must be positive"),
    ("gen", [CKPT, "--prompt_file", "bad/missing.txt"], "cannot read --prompt_file bad/missing.txt"),
    ("gen", [CKPT, "--prompt_file", "bad/empty.txt"], "--prompt_file bad/empty.txt is empty"),
    ("gen", [CKPT, "--prompt", "x", "--prompt_file", "bad/empty.txt"], "not allowed with argument"),
    ("gen", [CKPT, "--chat", "--interactive"], "not allowed with argument"),
    ("gen", [CKPT, "--output", "bad/a_file/out.txt"], "cannot write --output bad/a_file/out.txt"),
    ("gen", [CKPT, "--temp", "0.5"], "unknown flag --temp; did you mean --temperature"),
    ("gen", [CKPT, "--num_samples", "many"], "invalid int value: 'many'"),
]
if not torch.cuda.is_available():
    CASES.append(("gen", [CKPT, "--device", "cuda"], "sees no CUDA GPU; use --device cpu"))


@pytest.mark.parametrize("command, args, message", CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_bad_input_is_one_clear_line(user_dir, capsys, command, args, message):
    before = fingerprints(user_dir)
    main = {"train": train.main, "gen": gen.main, "eval": eval_cli.main, "plot": plot.main}[command]
    assert run_cli(main, args) == 2
    captured = capsys.readouterr()
    error = captured.err.strip()
    assert error.startswith("error: ") and "\n" not in error and "Traceback" not in error
    assert re.search(message, error), error
    assert fingerprints(user_dir) == before  # no good file changed, nothing half-written left
    assert not (user_dir / "bad" / "PWNED").exists()  # nothing in a checkpoint ever runs


def test_the_table_is_large():
    assert len(CASES) >= 25


def test_the_malicious_payload_is_live(user_dir):
    """The refusal above means something: an unsafe load of evil.pt does create the file."""
    torch.load(user_dir / "bad/evil.pt", weights_only=False)
    assert (user_dir / "bad" / "PWNED").exists()
