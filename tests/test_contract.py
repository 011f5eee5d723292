"""check_model.py: our GPT meets the contract, and each deliberately broken model fails the
check meant to catch it, with its hint."""
from __future__ import annotations

import random

import pytest
import torch
from torch import nn

import check_model
from cli import run_cli
from model import GPT
from tests.conftest import REPO_ROOT


def test_our_model_passes_every_check():
    outcomes = check_model.run_checks(GPT)
    assert [o.status for o in outcomes] == ["PASS"] * len(check_model.CHECKS), [o.line() for o in outcomes]


class Unbuilt(GPT):
    def __init__(self, cfg):
        raise NotImplementedError("write the embeddings first")


class LastPositionOnly(GPT):
    def forward(self, idx, targets=None):
        logits, loss = super().forward(idx, targets)
        return logits[:, -1], loss


class PeeksAhead(GPT):
    def forward(self, idx, targets=None):
        logits, _ = super().forward(idx)
        logits = logits + self.wte(idx.roll(-1, dims=1)).mean(-1, keepdim=True)  # the next token leaks in
        return logits, self.loss(logits, targets)

    @staticmethod
    def loss(logits, targets):
        if targets is None:
            return None
        return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


class DoubledLoss(GPT):
    def forward(self, idx, targets=None):
        logits, loss = super().forward(idx, targets)
        return logits, None if loss is None else 2 * loss


class DeadParameter(GPT):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.forgotten = nn.Parameter(torch.zeros(3))


class WrongBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad  # the true gradient of the identity is grad


class BadGradient(GPT):
    def forward(self, idx, targets=None):
        logits, _ = super().forward(idx)
        logits = WrongBackward.apply(logits)
        return logits, PeeksAhead.loss(logits, targets)


class Saturated(GPT):
    def forward(self, idx, targets=None):
        logits, _ = super().forward(idx)
        logits = logits.clamp(-0.05, 0.05)  # can never be confident
        return logits, PeeksAhead.loss(logits, targets)


class HiddenState(GPT):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.scale = torch.rand(())  # a plain attribute: not in the state dict

    def forward(self, idx, targets=None):
        logits, _ = super().forward(idx)
        logits = logits * (1 + self.scale)
        return logits, PeeksAhead.loss(logits, targets)


class RandomStart(GPT):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.offset = nn.Parameter(torch.tensor(random.random()))  # Python's generator, not torch's

    def forward(self, idx, targets=None):
        logits, _ = super().forward(idx)
        logits = logits + self.offset
        return logits, PeeksAhead.loss(logits, targets)


class ExtraBias(GPT):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.head_bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, idx, targets=None):
        logits, _ = super().forward(idx)
        logits = logits + self.head_bias
        return logits, PeeksAhead.loss(logits, targets)


@pytest.mark.parametrize("broken, check, hint", [
    (Unbuilt, "builds", "not written yet: write the embeddings first"),
    (LastPositionOnly, "shapes", "logits must be (batch, time, vocab_size)"),
    (PeeksAhead, "causality", "the model sees the future"),
    (DoubledLoss, "loss", "use F.cross_entropy"),
    (DeadParameter, "gradients", "no gradient reaches forgotten"),
    (BadGradient, "gradcheck", "differ from finite differences"),
    (Saturated, "overfits", "cannot memorise one batch"),
    (HiddenState, "state_dict", "some state lives outside parameters and buffers"),
    (RandomStart, "deterministic", "initialise only with torch's random functions"),
    (ExtraBias, "gpt2_param_count", "GPT-2's formula gives"),
])
def test_each_broken_model_fails_its_check_with_its_hint(broken, check, hint):
    checks = [c for c in check_model.CHECKS if c.name == check or broken is Unbuilt]
    outcomes = {o.name: o for o in check_model.run_checks(broken, checks)}
    assert outcomes[check].status == "FAIL" and hint in outcomes[check].hint, outcomes[check].line()
    if broken is Unbuilt:
        assert all(o.status == "FAIL" and "must build first; it checks: " in o.hint
                   for name, o in outcomes.items() if name != "builds")


def test_the_command_prints_a_line_per_check(capsys):
    assert run_cli(check_model.main, [f"{REPO_ROOT / 'model.py'}:GPT"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[:-1]] == ["PASS"] * len(check_model.CHECKS)
    assert out[-1] == f"{len(check_model.CHECKS)} of {len(check_model.CHECKS)} checks pass or do not apply"


@pytest.mark.parametrize("spec, message", [
    ("missing.py:MyGPT", "missing.py does not exist"),
    ("model.py", "must look like path/to/my_gpt.py:MyGPT"),
    ("model.py:MyGPT", "has no class MyGPT; it defines"),
])
def test_a_class_that_cannot_be_loaded_is_one_line(spec, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    assert run_cli(check_model.main, [spec]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and message in error and "\n" not in error
