"""TensorBoard and W&B get what metrics.csv gets, read back with their own readers; W&B stays
offline and off the network; a resume continues both runs; a logger that cannot start is one
line before the run, one that fails mid-run is a notice."""
from __future__ import annotations

import glob
import io
import json
import socket
import subprocess
import sys
import types
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

import loggers
import train
from checkpoint import load_checkpoint
from cli import run_cli
from config import Config, WandbConfig, resolve_config
from errors import UserError
from loggers import scalars, wandb_mode
from metrics import read_metrics
from tests.conftest import TINY_SETTINGS

WANDB = Path(sys.executable).with_name("wandb")
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def refuse_the_network(patch: pytest.MonkeyPatch) -> None:
    """Make any connection beyond this machine fail (wandb talks to its own service process
    over a local socket, which must go on working)."""
    def local(address: object) -> bool:
        return not isinstance(address, tuple) or str(address[0]) in LOCAL_HOSTS

    original_connect, original_lookup = socket.socket.connect, socket.getaddrinfo

    def connect(sock: socket.socket, address: object) -> None:
        if not local(address):
            raise AssertionError(f"a network connection was attempted: {address}")
        return original_connect(sock, address)

    def lookup(host: object, *args: object, **kwargs: object) -> list:
        if host not in (None, *LOCAL_HOSTS):
            raise AssertionError(f"a network lookup was attempted: {host}")
        return original_lookup(host, *args, **kwargs)

    patch.setattr(socket.socket, "connect", connect)
    patch.setattr(socket, "getaddrinfo", lookup)


def isolate_wandb(patch: pytest.MonkeyPatch, home: Path) -> None:
    """No login, no mode chosen, W&B's settings and caches in `home`: as on a fresh node."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "NETRC", "WANDB_BASE_URL"):
        patch.delenv(name, raising=False)
    patch.setenv("HOME", str(home))
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        patch.setenv(name, str(home / name.lower()))


def wandb_records(run_file: Path) -> list[dict]:
    """Return the records of a .wandb file, read by wandb's own reader."""
    done = subprocess.run([str(WANDB), "leet", "inspect", "--json", str(run_file)], capture_output=True,
                          text=True, timeout=60, env={"HOME": str(run_file.parent), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def history(records: list[dict]) -> dict[int, dict]:
    return {record["history"]["step"].get("num", 0): record["history"]["item"]
            for record in records if record["type"] == "history"}


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Return every scalar series TensorBoard shows for the run: {tag: [(step, value)]}."""
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def csv_losses(run_dir: Path, kind: str, column: str) -> list[tuple[int, float]]:
    return [(int(row["step"]), float(row[column])) for row in read_metrics(run_dir / "metrics.csv")
            if row["kind"] == kind]


def assert_same_series(shown: list[tuple[int, float]], written: list[tuple[int, float]]) -> None:
    """Equal steps, and values equal to metrics.csv's 6 digits."""
    assert [step for step, _ in shown] == [step for step, _ in written]
    assert [value for _, value in shown] == pytest.approx([value for _, value in written], rel=1e-5)


@dataclass
class LoggedRun:
    """A tiny run logged to TensorBoard and W&B (6 steps, evaluations at 3 and 6), then resumed
    from its step-3 checkpoint with another learning rate: steps 4-6 are trained again."""

    run_dir: Path
    first_output: str
    resumed_output: str


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, small_corpus_file) -> LoggedRun:
    folder = tmp_path_factory.mktemp("logged")
    settings = {**json.loads(json.dumps(TINY_SETTINGS)), "data": {"dataset": str(small_corpus_file)}}
    (folder / "tiny.json").write_text(json.dumps(settings))
    run_dir = folder / "run"
    flags = ["--config", str(folder / "tiny.json"), "--out_dir", str(run_dir), "--logger", "tensorboard",
             "--logger", "wandb", "--wandb.tags", "test,tiny"]
    outputs = []
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        refuse_the_network(patch)
        isolate_wandb(patch, folder / "home")
        for more in ([], ["--resume", str(run_dir / "ckpt-3.pt"), "--lr", "0.002"]):
            out = io.StringIO()
            with redirect_stdout(out):
                assert run_cli(train.main, [*flags, *more]) == 0
            outputs.append(out.getvalue())
    return LoggedRun(run_dir, *outputs)


def test_tensorboard_holds_every_metric_at_the_logged_steps(logged_run):
    shown = tensorboard_scalars(logged_run.run_dir / "tensorboard")
    # every step once, with the resumed session's figures for steps 4-6 (its lr differs)
    assert_same_series(shown["train/loss"], csv_losses(logged_run.run_dir, "train", "train_loss"))
    assert [step for step, _ in shown["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert_same_series(shown["eval/val_loss"], csv_losses(logged_run.run_dir, "eval", "val_loss"))
    assert_same_series(shown["train/lr"], csv_losses(logged_run.run_dir, "train", "lr"))
    assert {"eval/train_loss", "eval/val_perplexity", "eval/val_bits_per_char", "speed/tokens_per_s",
            "speed/tflops", "memory/rss_mb", "progress/tokens", "train/skipped_steps"} <= set(shown)


def test_the_resumed_session_hides_what_the_first_logged_after_its_checkpoint(logged_run):
    files = sorted((logged_run.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2  # one per session, in the one run directory
    restarts = [event.step for event in EventFileLoader(str(files[1])).Load()
                if event.HasField("session_log") and event.session_log.status == event.session_log.START]
    assert restarts == [4]  # TensorBoard drops the first session's steps from 4 on


def test_tensorboard_has_the_config_and_the_environment(logged_run):
    events = EventAccumulator(str(logged_run.run_dir / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    config = events.Tensors("config/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert '"lr": 0.002' in config  # the resumed session's
    assert '"loggers": [\n      "csv",\n      "tensorboard",\n      "wandb"' in config
    assert "git_commit" in events.Tensors("environment/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "_hparams_/experiment" in events.PluginTagToContent("hparams")


def test_wandb_leaves_an_offline_run_with_the_history_and_the_config(logged_run):
    run_id = load_checkpoint(logged_run.run_dir / "ckpt.pt")["wandb_run_id"]
    sessions = sorted((logged_run.run_dir / "wandb").glob(f"offline-run-*-{run_id}*"))
    assert len(sessions) == 2  # the resume kept the run id: `wandb sync` uploads them as one run
    first, resumed = (wandb_records(session / f"run-{run_id}.wandb") for session in sessions)
    csv = dict(csv_losses(logged_run.run_dir, "train", "train_loss"))
    logged = {**history(first), **history(resumed)}  # the resumed session's steps 4-6 win, as in the csv
    losses = {step: row["train/loss"] for step, row in logged.items() if "train/loss" in row}
    assert losses == pytest.approx(csv, rel=1e-5)
    val_loss = dict(csv_losses(logged_run.run_dir, "eval", "val_loss"))[3]
    assert history(first)[3]["eval/val_loss"] == pytest.approx(val_loss, rel=1e-5)
    run = next(r["run"] for r in first if r["type"] == "run")
    assert (run["project"], run["display_name"], run["tags"]) == ("gpt-trainer", "run", ["test", "tiny"])
    config = {}
    for record in first:
        if record["type"] == "config":
            config.update(record["config"]["update"])
    assert config["training"]["lr"] == 0.001 and config["environment"]["cpu_threads"] == "2"


def test_the_summaries_say_where_the_runs_lie_and_how_to_look(logged_run):
    run_dir = logged_run.run_dir
    for output in (logged_run.first_output, logged_run.resumed_output):
        assert f"tensorboard --logdir {run_dir / 'tensorboard'}" in output
        assert f"wandb sync {run_dir / 'wandb'}/offline-run-*-" in output
    report = (run_dir / "report.md").read_text()
    assert "files: tensorboard" in report and "files: wandb" in report


# ---------------------------------------------------------------- failures


def tiny_run(config_file: Path, *flags: str) -> int:
    return run_cli(train.main, ["--config", str(config_file), *flags])


@pytest.mark.parametrize("logger", ["tensorboard", "wandb"])
def test_a_missing_package_is_one_line_before_anything_is_written(workdir, tiny_config_file, monkeypatch,
                                                                  capsys, logger):
    monkeypatch.setitem(sys.modules, logger, None)  # what `import` makes of a package not installed
    assert tiny_run(tiny_config_file, "--logger", logger) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"pip install {logger}" in err and "Traceback" not in err
    assert not (workdir / "models").exists()


def test_a_folder_tensorboard_cannot_write_to_stops_the_run_before_its_first_step(workdir, tiny_config_file,
                                                                                 capsys):
    (workdir / "models" / "tiny_test").mkdir(parents=True)
    (workdir / "models" / "tiny_test" / "tensorboard").write_text("a file, not a folder")
    assert tiny_run(tiny_config_file, "--logger", "tensorboard") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write TensorBoard events" in err
    assert not (workdir / "models" / "tiny_test" / "ckpt.pt").exists()


def test_a_logger_failing_mid_run_is_a_notice_and_training_goes_on(workdir, tiny_config_file, monkeypatch,
                                                                   capsys):
    def full_disk(self, step, values):
        if step == 2:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(loggers.TensorBoardLogger, "log_metrics", full_disk)
    assert tiny_run(tiny_config_file, "--logger", "tensorboard") == 0
    out = capsys.readouterr().out
    assert out.count("tensorboard logging failed") == 1 and "No space left on device" in out
    rows = csv_losses(workdir / "models/tiny_test", "train", "train_loss")
    assert [step for step, _ in rows] == [1, 2, 3, 4, 5, 6]
    assert "view: tensorboard" not in out.split("[files]")[1]  # the summary no longer offers it


# ---------------------------------------------------------------- pieces


def test_wandb_is_offline_unless_logged_in_or_a_mode_is_chosen(tmp_path):
    no_netrc = tmp_path / "none"
    assert wandb_mode({}, no_netrc) == "offline"
    assert wandb_mode({"WANDB_MODE": "online"}, no_netrc) == "online"
    assert wandb_mode({"WANDB_API_KEY": "x" * 40}, no_netrc) == "online"
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "x" * 40 + "\n")
    netrc.chmod(0o600)
    assert wandb_mode({}, netrc) == "online"
    assert wandb_mode({"HOME": str(tmp_path)}) == "online"
    netrc.write_text("machine example.com login a password b\n")
    assert wandb_mode({}, netrc) == "offline"


def test_metrics_rows_become_scalars_without_empty_cells():
    assert scalars({"kind": "train", "step": 5, "train_loss": 2.5, "lr": 1e-3, "mfu": None, "rss_mb": 10.0,
                    "skipped_steps": 0}) == {"train/loss": 2.5, "train/lr": 1e-3, "memory/rss_mb": 10.0,
                                             "train/skipped_steps": 0.0}
    assert scalars({"kind": "eval", "step": 5, "train_loss": 2.0, "val_loss": 2.1, "rss_mb": 10.0}) == {
        "eval/train_loss": 2.0, "eval/val_loss": 2.1}


def test_loggers_are_a_list_in_files_and_repeated_flags_on_the_command_line(tmp_path):
    args = train.build_parser().parse_args(["--logger", "wandb", "--logger", "tensorboard,csv",
                                            "--wandb.tags", "a,b", "--wandb.tags", "c"])
    cfg = train.resolve_run_config(args)[0]
    assert cfg.training.loggers == ["csv", "wandb", "tensorboard"] and cfg.wandb.tags == ["a", "b", "c"]
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"training": {"loggers": ["tensorboard"]}, "wandb": {"group": "sweep"}}))
    cfg = resolve_config(str(path), {})
    assert cfg.training.loggers == ["csv", "tensorboard"] and cfg.wandb.group == "sweep"
    for loggers_value, message in (("tensorboard", "must be a list of strings"),
                                   (["tensorbord"], "one of csv, tensorboard, wandb; got 'tensorbord'")):
        path.write_text(json.dumps({"training": {"loggers": loggers_value}}))
        with pytest.raises(UserError, match=message):
            resolve_config(str(path), {})
    assert Config().training.loggers is not Config().training.loggers  # no list shared between configs


def fake_wandb(calls: list[str]) -> types.SimpleNamespace:
    """A stand-in for the wandb module whose online start times out, as on a node without a network."""
    def init(mode: str, settings: dict, **options: object) -> types.SimpleNamespace:
        calls.append(mode)
        if mode != "offline":
            raise TimeoutError("timed out after 60 seconds\nmore detail")
        return types.SimpleNamespace(settings=types.SimpleNamespace(mode="offline", sync_dir="the-sync-dir"))
    return types.SimpleNamespace(Settings=lambda **settings: settings, init=init)


def test_an_online_start_that_fails_falls_back_to_offline_with_a_notice(tmp_path, monkeypatch):
    calls, notices = [], []
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(calls))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    logger = loggers.WandbLogger(loggers.RunIdentity(tmp_path, None, "abcd1234"), WandbConfig(), notices.append)
    assert calls == ["online", "offline"]
    assert notices == ["W&B could not start online (timed out after 60 seconds); logging offline instead"]
    assert logger.where() == ("offline in the-sync-dir (upload: wandb sync "
                              f"{tmp_path}/wandb/offline-run-*-abcd1234*)")
    for session in ("20260101_000000-abcd1234", "20260101_000000-abcd1234-1"):  # resumed the same second
        (tmp_path / "wandb" / f"offline-run-{session}").mkdir()
    printed = logger.where().split("wandb sync ")[1].rstrip(")")
    assert len(glob.glob(printed)) == 2  # the printed command uploads both sessions
    monkeypatch.setenv("WANDB_MODE", "offline")  # offline itself failing is one line, before the run
    monkeypatch.setattr(sys.modules["wandb"], "init", lambda **options: 1 / 0)
    with pytest.raises(UserError, match=r"W&B \(offline\) could not start a run in .*/wandb: division by zero"):
        loggers.WandbLogger(loggers.RunIdentity(tmp_path, None, "abcd1234"), WandbConfig(), notices.append)
