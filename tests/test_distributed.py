"""Several processes with torchrun (Gloo on CPU): the same weights on every rank, the same
result as one process with the same global batch, portable checkpoints, clean stops."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import train
from checkpoint import load_checkpoint
from cli import run_cli
from distributed import Collectives, Ranks, ranks_from_environment, shard_evenly
from errors import UserError
from guards import StopSignals
from metrics import read_metrics
from tests.conftest import REPO_ROOT
from tests.test_corpus import CHATS, write_jsonl
from utils import resolve_system

PROBE = REPO_ROOT / "tests" / "ddp_probe.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def torchrun_env() -> dict:
    # one thread per process: two processes share this machine's cores
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONPATH": str(REPO_ROOT)}


def run_torchrun(record: Path, *flags: str, cwd: Path) -> str:
    """Run the probe (train.py's main) in two processes; return their output."""
    record.mkdir(exist_ok=True)
    done = subprocess.run([*TORCHRUN, str(PROBE), str(record), *flags], cwd=cwd, env=torchrun_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def assert_close_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)


# ---------------------------------------------------------------- the pieces, in one process


def test_ranks_come_from_torchruns_environment():
    assert ranks_from_environment({}) == Ranks()
    ranks = ranks_from_environment({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    assert ranks == Ranks(rank=3, local_rank=1, world_size=4, launched=True) and not ranks.is_main
    with pytest.raises(UserError, match="torchrun"):
        ranks_from_environment({"RANK": "x", "WORLD_SIZE": "2"})


@pytest.mark.parametrize("n_items", [0, 1, 5, 6, 7])
def test_shard_evenly_splits_items_and_pads_to_the_same_count(n_items):
    world = 3
    shares = [list(shard_evenly(iter(range(n_items)), Ranks(rank=r, world_size=world))) for r in range(world)]
    counted = sorted(item for share in shares for item, counts in share if counts)
    assert counted == list(range(n_items))  # each item scored once, by exactly one rank
    assert len({len(share) for share in shares}) == 1  # every rank runs as many forward passes
    assert all(item in range(n_items) for share in shares for item, _ in share)


def test_each_rank_trains_on_its_slice_of_the_one_process_batch(tiny_config_file):
    """Two ranks of batch 4 see exactly the windows one process of batch 8 sees."""
    def batches(rank: int, world: int, batch_size: int) -> list[torch.Tensor]:
        args = train.build_parser().parse_args(["--config", str(tiny_config_file),
                                                "--batch_size", str(batch_size), "--overwrite"])
        cfg, _, _ = train.resolve_run_config(args)
        system = resolve_system("cpu", "auto", False)
        collectives = Collectives(Ranks(rank=rank, world_size=world), system.device)  # no process group
        trainer = train.build_trainer(args, cfg, None, None, system, collectives)
        return [trainer._train_batch()[0] for _ in range(3)]

    one = batches(0, 1, 8)
    first, second = batches(0, 2, 4), batches(1, 2, 4)
    for whole, a, b in zip(one, first, second):
        assert torch.equal(whole, torch.cat([a, b]))
    assert not torch.equal(first[0], second[0])


def test_a_relayed_signal_is_not_a_second_one(monkeypatch):
    """torchrun relays the SIGTERM a worker already got; only a later one quits at once."""
    with StopSignals() as stop:
        stop.first_step_done()  # before it a signal stops at once (test_compile.py)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM
        monkeypatch.setattr(StopSignals, "RELAY_S", 0.0)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_signal_not_announced_still_stops(capsys):
    """Ranks other than 0 stop on a signal without saying so: rank 0 speaks for the run."""
    with StopSignals(announce=False) as stop:
        stop.first_step_done()  # before it a signal stops at once (test_compile.py)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- two processes under torchrun


DDP_SETTINGS = {
    "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16},
    "training": {"max_steps": 4, "batch_size": 4, "grad_accum_steps": 2, "eval_interval": 2,
                 "eval_iters": 3, "log_interval": 1, "warmup_steps": 1, "optimizer": "muon"},
    "system": {"device": "cpu", "dtype": "float32"},  # bfloat16 rounds beyond the tolerance
}
MY_GPT = f"{REPO_ROOT / 'examples' / 'my_gpt.py'}:MyGPT"
SHARDINGS = {"ddp": [], "fsdp": ["--system.fsdp", "true"]}


def write_ddp_config(folder: Path, corpus: Path) -> Path:
    path = folder / "ddp.json"
    path.write_text(json.dumps({**DDP_SETTINGS, "data": {"dataset": str(corpus)}}))
    return path


@pytest.fixture
def ddp_config(workdir, small_corpus_file) -> Path:
    return write_ddp_config(workdir, small_corpus_file)


@dataclass
class TwoProcessRuns:
    """The runs the equivalence tests compare, trained once for the module: each kind of run
    in one process with the global batch (one/), and with two processes under DDP and under
    FSDP (two/<kind>-<sharding>/) in one torchrun launch, which also continued one/plain's
    checkpoint under two processes (one-then-two/<sharding>/, from step 4 to 6)."""

    folder: Path
    output: str  # what the launch printed

    def one(self, kind: str) -> Path:
        return self.folder / "one" / kind

    def two(self, kind: str, sharding: str) -> Path:  # its name tags the weights it records
        return self.folder / "two" / f"{kind}-{sharding}"

    def one_then_two(self, sharding: str) -> Path:
        return self.folder / "one-then-two" / sharding


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, small_corpus_file) -> TwoProcessRuns:
    folder = tmp_path_factory.mktemp("torchrun")
    config = ["--config", str(write_ddp_config(folder, small_corpus_file))]
    kinds = {"plain": config, "chat": [*config, "--dataset", str(write_jsonl(folder / "chats.jsonl", CHATS * 20))],
             "mine": [*config, "--model_impl", MY_GPT]}
    runs = TwoProcessRuns(folder, "")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)  # the token cache goes to ./cache
        for kind, flags in kinds.items():
            assert run_cli(train.main, [*flags, "--out_dir", str(runs.one(kind)), "--batch_size", "8"]) == 0
    launch = []
    for sharding, flags in SHARDINGS.items():
        shutil.copytree(runs.one("plain"), runs.one_then_two(sharding))
        launch += ["--then", "--resume", str(runs.one_then_two(sharding) / "ckpt.pt"), "--max_steps", "6",
                   "--batch_size", "4", *flags]
        for kind, kind_flags in kinds.items():
            record = ["--record_weights", "--logger", "tensorboard"] if kind == "plain" else []  # rank 0 logs
            launch += ["--then", *kind_flags, "--out_dir", str(runs.two(kind, sharding)), *record, *flags]
    runs.output = run_torchrun(folder / "record", *launch[1:], cwd=folder)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("sharding", SHARDINGS)
def test_two_processes_equal_one_and_checkpoints_move_between_them(two_process_runs, sharding, monkeypatch):
    runs = two_process_runs
    assert "tokens per step    256 = 2 processes x batch 4 x accumulation 2 x context 16" in runs.output
    for step in range(1, 5):  # the ranks never drift apart
        ranks = [torch.load(runs.folder / "record" / f"weights-plain-{sharding}-rank{r}-step{step}.pt")
                 for r in (0, 1)]
        for name in ranks[0]:
            assert torch.equal(ranks[0][name], ranks[1][name]), (step, name)
    writes = json.loads((runs.folder / "record" / "writes-rank1.json").read_text())
    assert [w for w in writes if str(runs.folder) in w] == []  # rank 1 wrote nothing of any run's
    assert len(list((runs.two("plain", sharding) / "tensorboard").glob("events.*"))) == 1  # rank 0's events

    # one process, the same global batch (8 = 2 x 4), trains to the same weights and losses
    two_dir = runs.two("plain", sharding)
    two, one = load_checkpoint(two_dir / "ckpt.pt"), load_checkpoint(runs.one("plain") / "ckpt.pt")
    assert_close_weights(two["model"], one["model"])
    assert two["losses"]["final_val"] == pytest.approx(one["losses"]["final_val"], abs=1e-5)
    tied = {two["model"][name].untyped_storage().data_ptr() for name in ("wte.weight", "lm_head.weight")}
    assert len(tied) == 1  # the head is the embedding, saved once however the ranks held it

    # a two-process checkpoint continues in one process, a one-process one under two
    monkeypatch.chdir(runs.folder)
    assert run_cli(train.main, ["--resume", str(two_dir / "ckpt.pt"), "--max_steps", "6", "--batch_size", "8"]) == 0
    two_then_one = load_checkpoint(two_dir / "ckpt.pt")
    one_then_two = load_checkpoint(runs.one_then_two(sharding) / "ckpt.pt")
    assert two_then_one["step"] == one_then_two["step"] == 6
    assert_close_weights(two_then_one["model"], one_then_two["model"])


@pytest.mark.slow
@pytest.mark.parametrize("sharding", SHARDINGS)
def test_two_processes_on_chat_data_equal_one(two_process_runs, sharding):
    """Only the replies count: the ranks' micro-batches hold unequal numbers of targets, and a
    step still weighs every one of them alike, as one process with the whole batch does."""
    two_dir, one_dir = two_process_runs.two("chat", sharding), two_process_runs.one("chat")
    two, one = load_checkpoint(two_dir / "ckpt.pt"), load_checkpoint(one_dir / "ckpt.pt")
    assert_close_weights(two["model"], one["model"])
    reported = [[float(row["train_loss"]) for row in read_metrics(run / "metrics.csv")
                 if row["kind"] == "train"] for run in (two_dir, one_dir)]
    # metrics.csv keeps 6 digits: equal losses may round one unit of the last (1e-5) apart
    assert len(reported[0]) == 4 and reported[0] == pytest.approx(reported[1], abs=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("sharding", SHARDINGS)
def test_a_users_model_class_trains_under_torchrun_as_in_one_process(two_process_runs, sharding):
    two = load_checkpoint(two_process_runs.two("mine", sharding) / "ckpt.pt")
    one = load_checkpoint(two_process_runs.one("mine") / "ckpt.pt")
    assert "blocks.0.attention.query_key_value.weight" in two["model"]  # the user's class, sharded by block
    assert_close_weights(two["model"], one["model"])


@pytest.mark.slow
def test_sigterm_to_the_torchrun_group_stops_every_rank_with_one_checkpoint(workdir, ddp_config):
    command = [*TORCHRUN, str(PROBE), str(workdir / "record"), "--config", str(ddp_config),
               "--max_steps", "100000", "--eval_interval", "100000", "--training.keep_last", "0",
               "--log_interval", "3"]  # the ranks agree on stopping every third step only
    (workdir / "record").mkdir()
    process = subprocess.Popen(command, cwd=workdir, env=torchrun_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not any(re.match(r"step +3/", line) for line in lines) and time.monotonic() < deadline:
        assert process.poll() is None, "".join(lines)[-3000:]
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGTERM)  # what a scheduler or `kill -- -PGID` does
    process.wait(timeout=90)
    reader.join(timeout=10)
    output = "".join(lines)
    with pytest.raises(ProcessLookupError):  # no rank is left behind
        os.killpg(process.pid, 0)
    stopped = re.search(r"stopped by a signal at step (\d+)", output)
    assert stopped, output[-3000:]
    assert sorted(p.name for p in (workdir / "models" / "ddp").glob("*.pt")) == ["ckpt.pt"]
    checkpoint = load_checkpoint(workdir / "models" / "ddp" / "ckpt.pt")  # whole and verified
    assert checkpoint["step"] == int(stopped.group(1)) and checkpoint["step"] % 3 == 0
    assert "Traceback" not in output.split("stopped by a signal")[0]
    assert output.count("SIGTERM received") == 1, output[-3000:]  # rank 0 alone says so


# ---------------------------------------------------------------- the SLURM script, with stand-ins


def fake_slurm(workdir: Path, minutes_left: str) -> dict:
    """Return the environment of a one-node SLURM job whose srun, squeue and scontrol are
    stand-ins on PATH (squeue reports `minutes_left`; scontrol requeue is recorded)."""
    bin_dir = workdir / "fake-slurm"
    bin_dir.mkdir(exist_ok=True)
    stand_ins = {
        "srun": 'while [[ "$1" == --* ]]; do shift; done\nexec "$@"',
        "squeue": f'echo "{minutes_left}"',
        "scontrol": 'if [[ "$1" == show ]]; then echo localhost; else echo "$2" >> requeued.txt; fi',
        "torchrun": f'exec "{sys.executable}" -m torch.distributed.run "$@"',
    }
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    (workdir / "train.py").symlink_to(REPO_ROOT / "train.py")
    return {**torchrun_env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42",
            "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_NUM_NODES": "1", "GPUS_PER_NODE": "2",
            "RDZV_PORT": "29517", "OUT_DIR": "run"}


@pytest.mark.slow
def test_slurm_script_stops_before_the_limit_requeues_and_resumes(workdir, ddp_config):
    script = REPO_ROOT / "scripts" / "slurm_train.sh"
    env = {**fake_slurm(workdir, "5:20"), "MARGIN_S": "310"}  # 320 s left, minus the margin: --max_time 10
    first = subprocess.run(["bash", str(script), str(ddp_config), "--max_steps", "100000",
                            "--eval_interval", "100000"], cwd=workdir, env=env,
                           capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "to stay within --max_time 10s" in first.stdout
    assert (workdir / "requeued.txt").read_text() == "42\n"
    stopped_at = load_checkpoint(workdir / "run" / "ckpt.pt")["step"]

    # the requeued job finds the checkpoint and goes on from it
    finish = str(stopped_at + 2)
    second = subprocess.run(["bash", str(script), str(ddp_config), "--max_steps", finish], cwd=workdir,
                            env=env, capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming from run" in second.stdout
    assert load_checkpoint(workdir / "run" / "ckpt.pt")["step"] == stopped_at + 2
    assert (workdir / "requeued.txt").read_text() == "42\n"  # finished: not queued again


class PeerSays(Collectives):
    """One process playing rank 0 of two, whose peer's values are given: agree() takes the
    larger of each, as the all-reduce would."""

    def __init__(self, peer: list[int]):
        super().__init__(Ranks(rank=0, world_size=2), torch.device("cpu"))
        self.peer = peer

    def agree(self, values: list[int]) -> list[int]:
        self.agreements += 1
        return [max(mine, theirs) for mine, theirs in zip(values, self.peer)]

    agreements = 0
    active = False  # a test sets it once the trainer is built, to take the path of torchrun's loop


@pytest.mark.parametrize("peer, expected", [
    ([0, 0], ("finished", None)),
    ([1, 0], ("target", None)),
    ([2, 0], ("time", None)),
    ([3, int(signal.SIGTERM)], ("signal", signal.SIGTERM)),
])
def test_a_stop_seen_by_one_rank_stops_both(tiny_config_file, peer, expected):
    args = train.build_parser().parse_args(["--config", str(tiny_config_file), "--overwrite"])
    cfg, _, _ = train.resolve_run_config(args)
    system = resolve_system("cpu", "auto", False)
    trainer = train.build_trainer(args, cfg, None, None, system, PeerSays(peer))
    assert trainer._stop_reason(None) == expected  # this rank saw nothing itself


@pytest.mark.slow
def test_an_error_on_rank_0_during_setup_stops_rank_1_with_one_line(workdir, ddp_config):
    (workdir / "earlier").mkdir()
    (workdir / "earlier" / "ckpt.pt").write_bytes(b"an earlier run's")
    (workdir / "record").mkdir()
    done = subprocess.run([*TORCHRUN, str(PROBE), str(workdir / "record"), "--config", str(ddp_config),
                           "--out_dir", "earlier"], cwd=workdir, env=torchrun_env(), capture_output=True,
                          text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "error: earlier already holds a checkpoint of an earlier run" in output
    assert "error (rank 1): rank 0 could not prepare the run; its error is above" in output
    assert "[rank1]: Traceback" not in output and "[rank0]: Traceback" not in output
    assert (workdir / "earlier" / "ckpt.pt").read_bytes() == b"an earlier run's"  # nothing lost


def test_ranks_agree_on_stopping_only_after_reports_and_evaluations(tiny_config_file):
    """A stop one rank sees waits for the next report or evaluation, where both agree on it;
    the time limit then leaves room for every step until that one."""
    args = train.build_parser().parse_args(["--config", str(tiny_config_file), "--overwrite", "--max_steps", "100",
                                            "--log_interval", "5", "--eval_interval", "8", "--max_time", "1h"])
    cfg, _, _ = train.resolve_run_config(args)
    peer = PeerSays([3, int(signal.SIGTERM)])
    trainer = train.build_trainer(args, cfg, None, None, resolve_system("cpu", "auto", False), peer)
    peer.active = True
    decisions = {}
    for trainer.step in range(12):
        decisions[trainer.step] = trainer._stop_reason(None)
    assert {step for step, reason in decisions.items() if reason[0] == "signal"} == {0, 5, 8, 10}
    assert peer.agreements == 4  # the others answered without a collective
    trainer.timer.step_s, trainer.timer.save_s, trainer.timer.eval_s = 1.0, 0.0, 50.0
    trainer.step = 10  # the next decision after step 15: five steps, one safety step, no evaluation
    assert trainer.time_limit.deadline - time.time() > 3000
    trainer.time_limit.deadline = time.time() + 6.5
    assert not trainer._out_of_time()
    trainer.time_limit.deadline = time.time() + 5.5
    assert trainer._out_of_time()
    trainer.step = 5  # next after step 8, an evaluation: three steps, a safety step and 50 s
    trainer.time_limit.deadline = time.time() + 53.5
    assert trainer._out_of_time()
