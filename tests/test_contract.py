"""check_model.py: our GPT meets the contract, and each deliberately broken model fails the
check meant to catch it, with its hint."""
from __future__ import annotations

import ast
import random
import re
import subprocess
import sys

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


class BareLogitsWithoutTargets(GPT):
    def forward(self, idx, targets=None):
        logits, loss = super().forward(idx, targets)
        return (logits, loss) if targets is not None else logits


def test_a_forward_without_the_pair_fails_as_that_not_as_seeing_the_future():
    """causality read the first row of a bare logits tensor and said "the model sees the future"."""
    checks = [c for c in check_model.CHECKS if c.name in ("shapes", "causality", "state_dict", "deterministic")]
    outcomes = check_model.run_checks(BareLogitsWithoutTargets, checks)
    assert [(o.status, o.hint) for o in outcomes] == [("FAIL", "forward(idx) must return (logits, loss)")] * 4


def test_the_command_prints_a_line_per_check(capsys):
    assert run_cli(check_model.main, [f"{REPO_ROOT / 'model.py'}:GPT"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[:-1]] == ["PASS"] * len(check_model.CHECKS)
    assert out[-1] == f"{len(check_model.CHECKS)} of {len(check_model.CHECKS)} checks pass or do not apply"


@pytest.mark.parametrize("spec, message", [
    ("missing.py:MyGPT", "missing.py does not exist"),
    ("model.py", "must look like path/to/my_gpt.py:MyGPT"),
    ("model.py:MyGPT", "has no class MyGPT; it defines"),
    ("examples/my_gpt.py:MLP", "MLP has no method num_params(), which the contract requires"),
    ("check_model.py:Check", "Check must subclass torch.nn.Module"),
])
def test_a_class_that_cannot_be_loaded_is_one_line(spec, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    assert run_cli(check_model.main, [spec]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and message in error and "\n" not in error


class NanoGPTCount(GPT):
    def num_params(self):  # nanoGPT's habit: position embeddings left out
        return super().num_params() - self.wpe.weight.numel()


def test_a_count_that_leaves_parameters_out_fails_builds():
    outcome = check_model.run_checks(NanoGPTCount, check_model.CHECKS[:1])[0]
    assert outcome.status == "FAIL" and "num_params() returns 6,768 but the model has 6,896" in outcome.hint


EXAMPLES = REPO_ROOT / "examples"
# The order in which the skeleton's NotImplementedErrors meet a learner filling it in from the top
# of docs/build-your-own-gpt.md: each method written makes the checks name the next one.
TUTORIAL_ORDER = [("MyGPT", "__init__"), ("Block", "__init__"), ("CausalSelfAttention", "__init__"),
                  ("MLP", "__init__"), ("MyGPT", "num_params"), ("MyGPT", "forward"), ("Block", "forward"),
                  ("CausalSelfAttention", "forward"), ("MLP", "forward")]


def method_spans(text: str) -> dict[tuple[str, str], tuple[int, int]]:
    """(class, method) -> the first and last line of its definition in the source text."""
    tree = ast.parse(text)
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef)]
    return {(cls.name, fn.name): (fn.lineno, fn.end_lineno)
            for cls in classes for fn in cls.body if isinstance(fn, ast.FunctionDef)}


def fill_in(skeleton: str, finished: str, done: list[tuple[str, str]]) -> str:
    """The skeleton's text with the methods in `done` replaced by the finished model's."""
    lines, source = skeleton.splitlines(), finished.splitlines()
    spans, finished_spans = method_spans(skeleton), method_spans(finished)
    for key in sorted(done, key=lambda k: spans[k][0], reverse=True):  # from the bottom: lines stay put
        first, last = spans[key]
        new_first, new_last = finished_spans[key]
        lines[first - 1 : last] = source[new_first - 1 : new_last]
    return "\n".join(lines) + "\n"


def test_the_skeleton_fails_every_check_and_names_step_one():
    outcomes = check_model.run_checks(check_model.load_class(f"{EXAMPLES / 'my_gpt_skeleton.py'}:MyGPT"))
    assert [o.status for o in outcomes] == ["FAIL"] * len(check_model.CHECKS)
    assert outcomes[0].hint.startswith("not written yet: step 1, MyGPT.__init__: the token embedding")
    for outcome, check in zip(outcomes[1:], check_model.CHECKS[1:]):
        assert outcome.hint == f"not reached, the class must build first; it checks: {check.goal}"


def test_each_method_filled_in_makes_the_checks_name_the_next(tmp_path):
    skeleton = (EXAMPLES / "my_gpt_skeleton.py").read_text()
    finished = (EXAMPLES / "my_gpt.py").read_text()
    assert set(method_spans(skeleton)) == set(method_spans(finished)) == set(TUTORIAL_ORDER)
    first_two = check_model.CHECKS[:2]  # builds, shapes: where every unwritten method shows first
    for step in range(1, len(TUTORIAL_ORDER) + 1):
        path = tmp_path / f"step_{step}.py"
        path.write_text(fill_in(skeleton, finished, TUTORIAL_ORDER[: step - 1]))
        outcomes = check_model.run_checks(check_model.load_class(f"{path}:MyGPT"), first_two)
        failed = next(o for o in outcomes if o.status == "FAIL")
        cls, method = TUTORIAL_ORDER[step - 1]
        assert failed.hint.startswith(f"not written yet: step {step}, {cls}.{method}: "), failed.line()
    path = tmp_path / "done.py"
    path.write_text(fill_in(skeleton, finished, TUTORIAL_ORDER))
    assert [o.status for o in check_model.run_checks(check_model.load_class(f"{path}:MyGPT"), first_two)] == [
        "PASS", "PASS"]


def test_the_tutorials_finished_model_passes_every_check():
    outcomes = check_model.run_checks(check_model.load_class(f"{EXAMPLES / 'my_gpt.py'}:MyGPT"))
    assert [o.status for o in outcomes] == ["PASS"] * len(check_model.CHECKS), [o.line() for o in outcomes]


def test_the_tutorial_follows_the_skeleton_the_checks_and_the_finished_model():
    text = (REPO_ROOT / "docs" / "tutorials" / "build-your-own-gpt.md").read_text()
    steps = re.findall(r"^### Step (\d+): `(\w+)\.(\w+)`$", text, re.M)
    assert [(cls, method) for _, cls, method in steps] == TUTORIAL_ORDER
    skeleton = (EXAMPLES / "my_gpt_skeleton.py").read_text()
    assert all(f"step {n}, {cls}.{method}: " in skeleton for n, cls, method in steps)
    assert re.findall(r"^##+ (?:Check )?`(\w+)`", text, re.M) == [check.name for check in check_model.CHECKS]
    finished = (EXAMPLES / "my_gpt.py").read_text()
    for code in re.findall(r"```python\n(.*?)```", text, re.S):
        assert code in finished, code  # the tutorial shows the finished model's own lines
    first_output = re.search(r"```text\n(.*?)```", text, re.S).group(1).splitlines()
    skeleton_lines = [o.line() for o in check_model.run_checks(
        check_model.load_class(f"{EXAMPLES / 'my_gpt_skeleton.py'}:MyGPT"))]
    assert first_output[:3] == skeleton_lines[:3]


@pytest.mark.slow
def test_python_m_tests_contract_runs_the_checks():
    result = subprocess.run([sys.executable, "-m", "tests.contract", "examples/my_gpt_skeleton.py:MyGPT"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    lines = result.stdout.splitlines()
    assert result.returncode == 1 and len(lines) == len(check_model.CHECKS) + 1
    assert all(line.startswith("FAIL  ") for line in lines[:-1]) and lines[-1].startswith("0 of 10")
