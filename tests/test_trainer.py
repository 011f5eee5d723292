"""The training loop: accumulation, schedule, checkpoints, exact resume."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import train
from checkpoint import load_checkpoint, tokens_seen
from config import TrainingConfig
from metrics import read_metrics
from model import GPT, IGNORE_INDEX
from distributed import Collectives, Ranks
from optim import (
    accumulate_gradients,
    learning_rate,
    make_optimizer,
    optimizer_step,
    token_weights,
    total_steps,
)
from tests.conftest import tiny_model_config
from tests.test_corpus import CHATS, write_jsonl
from trainer import LossRecord
from utils import resolve_system


@pytest.mark.parametrize("masked", [False, True], ids=["every-target", "masked-unevenly"])
def test_accumulated_micro_batches_equal_one_big_batch(masked):
    torch.manual_seed(0)
    big = GPT(tiny_model_config())
    small = copy.deepcopy(big)
    x, y = torch.randint(0, 11, (8, 8)), torch.randint(0, 11, (8, 8))
    if masked:  # chat data: the micro-batches of 2 windows count 16, 9, 1 and 0 targets
        kept = torch.cat([(torch.arange(16) < n).view(2, 8) for n in (16, 9, 1, 0)])
        y = y.masked_fill(~kept, IGNORE_INDEX)
    cfg = TrainingConfig(lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    no_autocast = torch.autocast("cpu", enabled=False)
    optimizers = [make_optimizer(m, cfg, torch.device("cpu")) for m in (big, small)]

    loss_big = accumulate_gradients(big, [(x, y)], 1, no_autocast, scaler)
    micro = [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)]
    one_process = Collectives(Ranks(), torch.device("cpu"))
    weights = token_weights([t for _, t in micro], one_process) if masked else None
    loss_small = accumulate_gradients(small, micro, 4, no_autocast, scaler, weights=weights)

    assert torch.allclose(loss_big, loss_small, atol=1e-6)
    for p_big, p_small in zip(big.parameters(), small.parameters()):
        assert torch.allclose(p_big.grad, p_small.grad, atol=1e-6)
    for model, optimizer in zip((big, small), optimizers):
        assert optimizer_step(model, optimizer, scaler, grad_clip=1.0)
    for p_big, p_small in zip(big.parameters(), small.parameters()):
        assert torch.allclose(p_big, p_small, atol=1e-6)


def test_weight_decay_applies_to_matrices_only():
    model = GPT(tiny_model_config())
    optimizer = make_optimizer(model, TrainingConfig(weight_decay=0.3), torch.device("cpu"))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_learning_rate_warms_up_then_decays_to_min_lr():
    t = TrainingConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    lrs = [learning_rate(step, t, max_steps=100) for step in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[10] == pytest.approx(1e-3)
    assert lrs[55] == pytest.approx(5.5e-4)  # half way down the cosine
    assert lrs[100] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert learning_rate(500, t, max_steps=100) == pytest.approx(1e-4)


def test_warmup_stable_decay_schedule():
    t = TrainingConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, schedule="wsd", cooldown_fraction=0.2)
    lrs = [learning_rate(step, t, max_steps=110) for step in range(111)]
    assert lrs[9] == pytest.approx(1e-3) and lrs[50] == pytest.approx(1e-3) and lrs[90] == pytest.approx(1e-3)
    assert lrs[100] == pytest.approx(5.5e-4)  # half way down the last 20 steps
    assert lrs[110] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_epochs_set_the_number_of_steps():
    assert total_steps(TrainingConfig(max_steps=7), 10_000, 100) == 7
    assert total_steps(TrainingConfig(epochs=2.5), 10_000, 300) == 84


def test_loss_record_keeps_best_and_worst():
    record = LossRecord()
    assert record.update(10, 2.0, 2.5) is True
    assert record.update(20, 1.5, 2.7) is False
    assert record.update(30, 1.8, 2.1) is True
    assert (record.best_val, record.best_val_step, record.worst_val) == (2.1, 30, 2.7)
    assert (record.best_train, record.worst_train) == (1.5, 2.0)


def run(config_file, *flags) -> int:
    return train.main(["--config", str(config_file), *flags])


def test_training_writes_loadable_checkpoints(workdir, tiny_config_file, capsys):
    assert run(tiny_config_file) == 0
    out = capsys.readouterr().out
    assert "step      3: train loss" in out and "step      6: train loss" in out
    run_dir = workdir / "models" / "tiny_test"
    checkpoint = load_checkpoint(run_dir / "ckpt.pt")
    assert checkpoint["step"] == 6
    # the characters and three special tokens, rounded up to a multiple of 64
    assert len(checkpoint["tokenizer"]["chars"]) + 3 <= checkpoint["config"]["model"]["vocab_size"] == 64
    # plain data only: torch's safe loader opens it without help
    torch.load(run_dir / "ckpt.pt", weights_only=True)
    best = load_checkpoint(run_dir / "best.pt")
    assert best["losses"]["best_val"] == checkpoint["losses"]["best_val"]
    assert best["step"] == checkpoint["losses"]["best_val_step"]


def step_losses(out: str) -> dict[str, str]:
    """Return {'4/6': '3.4996', ...}: the loss printed at each step, without the timings."""
    return {line.split()[1]: line.split()[3] for line in out.splitlines() if line.startswith("step ")
            and "/" in line.split()[1]}


@pytest.mark.parametrize("sampling", ["random", "sequential"])
def test_resume_continues_exactly_where_it_stopped(workdir, tiny_config_file, capsys, sampling):
    # one go of 6 steps, against 3 steps then a resume to 6; same schedule in both
    schedule = ["--training.lr_decay_steps", "6", "--model.dropout", "0.1", "--data.sampling", sampling]
    assert run(tiny_config_file, *schedule, "--out_dir", "straight") == 0
    straight_losses = step_losses(capsys.readouterr().out)
    assert run(tiny_config_file, *schedule, "--out_dir", "split", "--max_steps", "3") == 0
    assert load_checkpoint(workdir / "split/ckpt.pt")["step"] == 3
    capsys.readouterr()
    assert run(tiny_config_file, *schedule, "--out_dir", "split", "--resume") == 0
    resumed_losses = step_losses(capsys.readouterr().out)
    assert list(resumed_losses) == ["4/6", "5/6", "6/6"]
    assert resumed_losses == {k: v for k, v in straight_losses.items() if k in resumed_losses}
    straight = load_checkpoint(workdir / "straight/ckpt.pt")
    split = load_checkpoint(workdir / "split/ckpt.pt")
    assert split["step"] == straight["step"] == 6
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, split["model"][name]), name
    for index, state in straight["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, split["optimizer"]["state"][index][key])
    assert straight["losses"] == split["losses"]


def test_a_resumed_run_keeps_its_own_data_whatever_its_config_file_says(workdir, tiny_config_file,
                                                                         small_corpus_file, capsys):
    """The run began with --dataset other.txt; its config file names another text. Resuming with
    that file used to switch the run's data (or, for Tiny Shakespeare, try a download)."""
    other = workdir / "other.txt"
    other.write_text(small_corpus_file.read_text()[::-1])
    assert run(tiny_config_file, "--dataset", str(other), "--max_steps", "3") == 0
    capsys.readouterr()

    def resumed(*flags: str):
        args = train.build_parser().parse_args(["--config", str(tiny_config_file), "--resume", *flags])
        return train.resolve_run_config(args)[0].data

    assert resumed().dataset == str(other)
    assert (f"notice: resuming on the run's own data settings (dataset '{other}', not '{small_corpus_file}' as "
            f"{tiny_config_file} says); flags such as --dataset choose others") in capsys.readouterr().err
    assert resumed("--dataset", str(small_corpus_file)).dataset == str(small_corpus_file)  # typed: as asked
    assert "notice" not in capsys.readouterr().err
    assert run(tiny_config_file, "--resume") == 0
    assert load_checkpoint(workdir / "models/tiny_test/ckpt.pt")["config"]["data"]["dataset"] == str(other)
    # where and how this machine reads the data stays the file's: a requeued job may run elsewhere
    moved = workdir / "moved.json"
    moved.write_text(json.dumps({**json.loads(tiny_config_file.read_text()), "data": {
        "dataset": str(small_corpus_file), "cache_dir": "elsewhere", "num_workers": 1}}))
    args = train.build_parser().parse_args(["--config", str(moved), "--out_dir", "models/tiny_test", "--resume"])
    data = train.resolve_run_config(args)[0].data
    assert (data.dataset, data.cache_dir, data.num_workers) == (str(other), "elsewhere", 1)
    # without --config, the checkpoint's own config, as with --resume PATH
    args = train.build_parser().parse_args(["--out_dir", "models/tiny_test", "--resume"])
    assert train.resolve_run_config(args)[0] == train.resolve_run_config(
        train.build_parser().parse_args(["--resume", "models/tiny_test/ckpt.pt"]))[0]


def test_tokens_seen_count_on_over_a_resume_with_another_batch(workdir, tiny_config_file, capsys):
    """They were step x this session's tokens per step: 2 processes resuming a 1-process run doubled them."""
    assert run(tiny_config_file, "--max_steps", "3", "--log_interval", "1") == 0  # 3 x 64 tokens
    capsys.readouterr()
    assert run(tiny_config_file, "--batch_size", "8", "--log_interval", "1", "--resume") == 0  # 3 x 128 more
    captured = capsys.readouterr()
    assert ("notice: this session trains on 128 tokens a step, the run's last one on 64; tokens seen count on "
            "from 192") in captured.err
    assert re.search(r"tokens seen +576\n", captured.out)
    checkpoint = load_checkpoint(workdir / "models/tiny_test/ckpt.pt")
    assert checkpoint["tokens"] == 576 and tokens_seen(checkpoint) == 576
    rows = [row for row in read_metrics(workdir / "models/tiny_test/metrics.csv") if row["kind"] == "train"]
    assert [int(row["tokens"]) for row in rows] == [64, 128, 192, 320, 448, 576]
    del checkpoint["tokens"]  # written before the count was kept: step x its last session's tokens per step
    assert tokens_seen(checkpoint) == 6 * 128


def test_resume_restores_the_optimizer_state(workdir, tiny_config_file):
    run(tiny_config_file, "--max_steps", "3")
    checkpoint = load_checkpoint(workdir / "models/tiny_test/ckpt.pt")
    args = train.build_parser().parse_args(["--config", str(tiny_config_file), "--resume"])
    cfg, loaded, path = train.resolve_run_config(args)
    trainer = train.build_trainer(args, cfg, loaded, path, resolve_system("cpu", "auto", None))
    assert trainer.step == 3
    restored = trainer.optimizer.state_dict()["state"]
    for index, state in checkpoint["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(restored[index][key], value)


def test_load_model_only_starts_at_step_zero_from_the_weights(workdir, tiny_config_file, capsys):
    run(tiny_config_file, "--max_steps", "3")
    source = load_checkpoint(workdir / "models/tiny_test/ckpt.pt")
    assert run(tiny_config_file, "--load_model_only", "models/tiny_test/ckpt.pt", "--out_dir", "fine",
               "--max_steps", "1", "--eval_interval", "100", "--lr", "1e-9", "--training.warmup_steps", "0",
               "--training.min_lr", "0") == 0
    assert "starting from the weights of models/tiny_test/ckpt.pt" in capsys.readouterr().out
    tuned = load_checkpoint(workdir / "fine/ckpt.pt")
    assert tuned["step"] == 1
    for name, tensor in source["model"].items():  # a 1e-9 step barely moves the weights
        assert torch.allclose(tensor, tuned["model"][name], atol=1e-6)


def test_finished_run_is_not_trained_further(workdir, tiny_config_file, capsys):
    run(tiny_config_file)
    assert run(tiny_config_file, "--resume") == 0
    assert "already trained to step 6 of 6" in capsys.readouterr().out


def test_full_validation_split_loss(workdir, tiny_config_file):
    trainer = build(tiny_config_file, "--training.eval_full_val", "true")
    val = torch.from_numpy(trainer.data.val.astype("int64"))
    T = trainer.cfg.model.block_size
    n = (len(val) - 1) // T
    with torch.no_grad():
        _, expected = trainer.model.eval()(val[: n * T].view(n, T), val[1 : n * T + 1].view(n, T))
    assert trainer.evaluate()["val"] == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("train_iters, expected", [("5", 5), ("null", 3)])
def test_the_train_loss_at_an_evaluation_has_a_batch_count_of_its_own(workdir, tiny_config_file, train_iters,
                                                                       expected):
    trainer = build(tiny_config_file, "--eval_iters", "3", "--training.eval_train_iters", train_iters)
    assert [len(list(trainer._eval_batches(split))) for split in ("train", "val")] == [expected, 3]
    full = build(tiny_config_file, "--training.eval_full_val", "true", "--training.eval_train_iters", "1")
    assert len(list(full._eval_batches("train"))) == 1  # the val split is scored whole all the same


def build(config_file, *flags: str, system=None):
    args = train.build_parser().parse_args(["--config", str(config_file), *flags])
    cfg, _, _ = train.resolve_run_config(args)
    return train.build_trainer(args, cfg, None, None, system or resolve_system("cpu", "auto", None))


def test_tokens_on_the_device_train_exactly_as_tokens_on_the_host(workdir, tiny_config_file):
    runs = {}
    for resident in ("false", "true"):
        trainer = build(tiny_config_file, "--system.data_on_device", resident, "--out_dir", f"r{resident}")
        assert isinstance(trainer.data.train, torch.Tensor) == (resident == "true")
        losses = [trainer.train_step()[0].item() for _ in range(3)]
        runs[resident] = (losses, trainer.evaluate(), trainer.model.state_dict())
    (losses_a, eval_a, weights_a), (losses_b, eval_b, weights_b) = runs.values()
    assert losses_a == losses_b and eval_a == eval_b
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_compile_mode_reaches_torch_compile(workdir, tiny_config_file, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: calls.append((model, kwargs)) or model)
    system = dataclasses.replace(resolve_system("cpu", "auto", None, compile_mode="reduce-overhead"), compile=True)
    trainer = build(tiny_config_file, "--system.compile_mode", "reduce-overhead", system=system)
    assert calls == [(trainer.model, {"mode": "reduce-overhead"})] and trainer.compiled == "model"


@pytest.mark.skipif(not hasattr(torch.compiler, "set_stance"), reason="blocks compile apart from torch 2.6")
def test_the_default_mode_compiles_each_transformer_block(workdir, tiny_config_file, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: calls.append(kwargs) or model)
    system = dataclasses.replace(resolve_system("cpu", "auto", None), compile=True)  # auto: default on a CPU
    trainer = build(tiny_config_file, system=system)
    assert calls == [{"mode": "default"}] * len(trainer.model.blocks)
    assert trainer.compiled == "blocks" and trainer.forward_model is trainer.model


def test_a_batch_without_counted_targets_adds_nothing_to_the_evaluation(workdir, tiny_config_file,
                                                                        monkeypatch):
    trainer = build(tiny_config_file, system=resolve_system("cpu", "float32", None))
    x = torch.randint(0, 11, (4, 16))
    some = torch.full_like(x, IGNORE_INDEX)
    some[:, :3] = x[:, :3]  # 12 counted targets
    nothing = torch.full_like(x, IGNORE_INDEX)  # a chat window of user turns only
    with torch.no_grad():
        _, expected = trainer.model.eval()(x, some)

    def score(*batches):
        monkeypatch.setattr(trainer, "_eval_batches", lambda split: iter([(b, True) for b in batches]))
        return trainer.evaluate()

    assert score((x, some), (x, nothing)) == pytest.approx({"train": expected.item(), "val": expected.item()},
                                                           rel=1e-6)
    assert all(math.isnan(loss) for loss in score((x, nothing)).values())  # no target to score, not 0


def test_masked_micro_batches_of_the_trainer_equal_one_big_batch(workdir, tiny_config_file):
    """Chat data: the loss of a step is the mean over its counted targets however it is cut."""
    chats = write_jsonl(workdir / "chats.jsonl", CHATS * 20)
    runs = []
    for batch_size, accumulation in ((8, 1), (4, 2)):
        trainer = build(tiny_config_file, "--dataset", str(chats), "--batch_size", str(batch_size),
                        "--training.grad_accum_steps", str(accumulation), "--out_dir", f"b{batch_size}",
                        system=resolve_system("cpu", "float32", None))
        assert trainer.data.train_mask is not None
        runs.append(([trainer.train_step()[0].item() for _ in range(3)], trainer.model.state_dict()))
    (losses_big, weights_big), (losses_small, weights_small) = runs
    assert losses_small == pytest.approx(losses_big, abs=1e-6)
    for name, tensor in weights_big.items():
        torch.testing.assert_close(weights_small[name], tensor, rtol=0, atol=1e-6, msg=name)


class HostReads(TorchDispatchMode):
    """Records each operation by which the host reads a tensor's value (.item(), bool(), int():
    on a GPU, the host waiting for the device), with the trainer's step and whether it came
    from inside a training step."""

    READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)

    def __init__(self, trainer):
        super().__init__()
        self.trainer, self.in_step, self.reads = trainer, False, []
        train_step = trainer.train_step

        def counted_step():
            self.in_step = True
            try:
                return train_step()
            finally:
                self.in_step = False

        trainer.train_step = counted_step

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.reads.append((self.trainer.step, self.in_step))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("flags", [
    [],
    ["--training.optimizer", "muon", "--training.grad_accum_steps", "2"],
    ["--training.grad_clip", "0"],
    ["--training.optimizer", "muon", "--chat"],
], ids=["adamw", "muon-accumulated", "adamw-unclipped", "muon-chat"])
def test_a_training_step_never_reads_the_device(workdir, tiny_config_file, flags):
    """No host-device sync in a step: the host reads values only at progress reports (steps 5,
    10 and the last, 12), the evaluation and the save."""
    if "--chat" in flags:  # a loss mask: token_weights' counts stay on the device too
        flags = [f for f in flags if f != "--chat"] + ["--dataset", str(write_jsonl(workdir / "c.jsonl", CHATS * 20))]
    trainer = build(tiny_config_file, "--max_steps", "12", "--log_interval", "5", "--eval_interval", "100", *flags,
                    system=resolve_system("cpu", "float32", None))
    with HostReads(trainer) as host:
        trainer.train()
    assert not [step for step, in_step in host.reads if in_step]
    assert {step for step, _ in host.reads} == {5, 10, 12}  # the reports (and at 12 evaluation, save)
