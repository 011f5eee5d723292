"""Grade a GPT implementation against the contract the trainer relies on:
`python check_model.py path/to/my_gpt.py:MyGPT` (our own: `python check_model.py model.py:GPT`).

The contract is written down in contract.py: a torch.nn.Module built from a ModelConfig,
whose forward(idx, targets=None) returns (logits of shape (B, T, vocab_size), loss or None), and
num_params(). Each check prints one line, PASS or FAIL with a hint naming what to look at (a
check not reached says what it would check); the exit status is 0 when all pass, 1 when one
fails, 2 when the class cannot be loaded at all. docs/tutorials/build-your-own-gpt.md meets them in order.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.nn import functional as F

from cli import CliParser, run_cli
from config import ModelConfig
from contract import check_class, load_class
from errors import UserError


class ContractError(Exception):
    """A check failed; the message is the hint shown to the learner."""


class NotApplicable(Exception):
    """A check that does not apply to this class; the message says why."""


@dataclass(frozen=True)
class Check:
    name: str
    run: Callable[[type], None]  # raises ContractError with a hint
    goal: str  # what it checks, in a line


def tiny_config(**changes) -> ModelConfig:
    """The small GPT-2-shaped model every check builds (float32, no dropout)."""
    settings = dict(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=11, dropout=0.0, bias=True)
    return ModelConfig(**{**settings, **changes})


def build(cls: type, seed: int = 0, **changes) -> torch.nn.Module:
    torch.manual_seed(seed)
    return cls(tiny_config(**changes))


def batch(seed: int = 1, batch_size: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, tiny_config().vocab_size, (batch_size, tiny_config().block_size + 1),
                           generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def expect(condition: bool, hint: str) -> None:
    if not condition:
        raise ContractError(hint)


# ---------------------------------------------------------------- checks, in the order a learner meets them


def check_builds(cls: type) -> None:
    """MyGPT(config) builds a torch.nn.Module whose num_params() counts its parameters"""
    try:
        check_class(cls)
    except UserError as error:
        raise ContractError(str(error)) from None
    try:
        model = build(cls)
    except NotImplementedError as error:
        raise ContractError(f"not written yet: {error}") from None
    counted, actual = model.num_params(), sum(p.numel() for p in model.parameters())
    shown = f"{counted:,}" if isinstance(counted, int) else repr(counted)
    expect(counted == actual, f"num_params() returns {shown} but the model has {actual:,} parameters: "
                              "return sum(p.numel() for p in self.parameters()) (a shared tensor once)")


def logits_of(output: object) -> torch.Tensor:
    """The logits of forward(idx)'s output, where it is the (logits, loss) the contract asks for;
    other checks then fail for what they check, not for a bare tensor's first row."""
    expect(isinstance(output, tuple) and len(output) == 2, "forward(idx) must return (logits, loss)")
    return output[0]


def check_shapes(cls: type) -> None:
    """forward(idx) returns (logits (batch, time, vocab_size), None); with targets, a scalar loss"""
    model = build(cls)
    x, y = batch()
    output = model(x)
    logits, loss = logits_of(output), output[1]
    expect(tuple(logits.shape) == (*x.shape, tiny_config().vocab_size),
           f"logits must be (batch, time, vocab_size) = {(*x.shape, tiny_config().vocab_size)}, "
           f"got {tuple(logits.shape)}")
    expect(loss is None, "without targets, forward must return None for the loss")
    loss = model(x, y)[1]
    expect(loss is not None and loss.dim() == 0,
           "with targets, forward must return the loss as a scalar tensor")


def check_causality(cls: type) -> None:
    """changing a token never changes the logits of the positions before it"""
    model = build(cls).eval()
    x, _ = batch()
    changed = x.clone()
    changed[:, -1] = (changed[:, -1] + 1) % tiny_config().vocab_size
    with torch.no_grad():
        before, after = logits_of(model(x)), logits_of(model(changed))
    expect(torch.allclose(before[:, :-1], after[:, :-1], atol=1e-6),
           "changing the last token changed the logits of earlier positions: the model sees the future; "
           "mask attention scores above the diagonal (is_causal=True, or a lower-triangular mask)")


def check_loss(cls: type) -> None:
    """the loss is the cross-entropy of the logits against the targets"""
    model = build(cls).eval()
    x, y = batch()
    with torch.no_grad():
        logits, loss = model(x, y)
    expected = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
    expect(torch.allclose(loss, expected, atol=1e-5),
           f"the loss is {loss.item():.5f} but the cross-entropy of the logits is {expected.item():.5f}: "
           "use F.cross_entropy(logits.view(-1, vocab), targets.view(-1)), the mean over every token")


def check_gradients(cls: type) -> None:
    """a gradient reaches every parameter"""
    model = build(cls)
    x, y = batch()
    model(x, y)[1].backward()
    dead = [name for name, p in model.named_parameters()
            if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    expect(not dead, f"no gradient reaches {', '.join(dead[:3])}{' ...' if len(dead) > 3 else ''}: "
                     "a parameter the forward pass never uses (or uses only through detach())")


def check_gradcheck(cls: type) -> None:
    """autograd's gradients match finite differences (float64, one layer)"""
    model = build(cls, n_layer=1, n_embd=8, n_head=2, block_size=4, vocab_size=5).double()
    x = torch.tensor([[1, 2, 3, 4], [0, 4, 2, 1]]) % 5
    y = torch.tensor([[2, 3, 4, 0], [4, 2, 1, 3]]) % 5
    names = [name for name, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in model.parameters())

    def loss_of(*values: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, dict(zip(names, values)), (x, y))[1]

    ok = torch.autograd.gradcheck(loss_of, params, eps=1e-6, atol=1e-5, raise_exception=False)
    expect(ok, "the gradients autograd computes differ from finite differences (in float64): an "
               "operation that breaks autograd, such as an in-place change of a tensor needed later")


def check_overfits(cls: type) -> None:
    """150 AdamW steps memorise one batch (loss under 0.2)"""
    model = build(cls)
    x, y = batch(batch_size=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = None
    for _ in range(150):
        loss = model(x, y)[1]
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    expect(loss.item() < 0.2, f"150 AdamW steps on one batch took the loss from {first:.3f} only to "
                              f"{loss.item():.3f} (should be under 0.2): a model that cannot memorise "
                              "one batch has a bug between its layers (a residual, a norm, the head)")


def check_state_dict(cls: type) -> None:
    """a copy loaded from state_dict() computes the same logits"""
    model, other = build(cls, seed=0).eval(), build(cls, seed=1).eval()
    other.load_state_dict(model.state_dict())
    x, _ = batch()
    with torch.no_grad():
        expect(torch.equal(logits_of(model(x)), logits_of(other(x))),
               "a copy loaded from state_dict() computes other logits: some state lives outside "
               "parameters and buffers (a plain tensor attribute?)")


def check_deterministic(cls: type) -> None:
    """the same torch.manual_seed builds the same model"""
    x, _ = batch()
    with torch.no_grad():
        first, second = (logits_of(build(cls, seed=3).eval()(x)) for _ in range(2))
    expect(torch.equal(first, second), "two models built after the same torch.manual_seed differ: "
                                       "initialise only with torch's random functions")


def check_gpt2_param_count(cls: type) -> None:
    """num_params() is GPT-2's count (for classes that say gpt2_compatible = True)"""
    if not getattr(cls, "gpt2_compatible", False):
        raise NotApplicable("the class does not say gpt2_compatible = True")
    cfg = tiny_config()
    d, layers = cfg.n_embd, cfg.n_layer
    expected = cfg.vocab_size * d + cfg.block_size * d + layers * (12 * d * d + 13 * d) + 2 * d
    counted = build(cls).num_params()
    expect(counted == expected, f"num_params() is {counted:,}; GPT-2's formula gives {expected:,} "
                                "(V*d + T*d + L*(12*d*d + 13*d) + 2*d, the tied head counted once)")


CHECKS = [Check(f.__name__.removeprefix("check_"), f, f.__doc__) for f in (
    check_builds, check_shapes, check_causality, check_loss, check_gradients, check_gradcheck,
    check_overfits, check_state_dict, check_deterministic, check_gpt2_param_count)]


@dataclass(frozen=True)
class Outcome:
    name: str
    status: str  # PASS, FAIL or SKIP
    hint: str = ""

    def line(self) -> str:
        return f"{self.status}  {self.name}" + (f": {self.hint}" if self.hint else "")


def run_checks(cls: type, checks: Sequence[Check] = CHECKS) -> list[Outcome]:
    """Return the outcome of each check. After a class fails to build, the others cannot run
    and fail saying so."""
    results: list[Outcome] = []
    for check in checks:
        if results and results[0].name == "builds" and results[0].status == "FAIL":
            results.append(Outcome(check.name, "FAIL", f"not reached, the class must build first; it checks: "
                                                         f"{check.goal}"))
            continue
        try:
            check.run(cls)
            results.append(Outcome(check.name, "PASS"))
        except NotApplicable as why:
            results.append(Outcome(check.name, "SKIP", str(why)))
        except ContractError as error:
            results.append(Outcome(check.name, "FAIL", str(error)))
        except NotImplementedError as error:
            results.append(Outcome(check.name, "FAIL", f"not written yet: {error}"))
        except Exception as error:  # a learner's bug: report it as this check's failure
            results.append(Outcome(check.name, "FAIL", f"raised {type(error).__name__}: {error}"))
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(description="Check a GPT class against the trainer's contract.", allow_abbrev=False)
    parser.add_argument("model", help="path/to/my_gpt.py:MyGPT")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # a user's file may import config
    cls = load_class(args.model)
    check_class(cls)  # not a Module, or a required method missing: one line, exit 2
    results = run_checks(cls)
    for outcome in results:
        print(outcome.line())
    failed = sum(outcome.status == "FAIL" for outcome in results)
    print(f"{len(results) - failed} of {len(results)} checks pass or do not apply")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
