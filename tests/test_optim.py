"""Optimizers: the Muon/AdamW split, Newton-Schulz orthogonalisation, AdamW arithmetic."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import muon
import train
from checkpoint import load_checkpoint
from config import TrainingConfig
from contract import load_class
from model import GPT
from muon import MuonWithAdamW, orthogonalize
from optim import make_optimizer, newton_schulz_dtype, optimizer_step, set_learning_rates
from tests.conftest import REPO_ROOT, tiny_model_config


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 40)])
def test_orthogonalize_flattens_the_spectrum(shape):
    torch.manual_seed(0)
    matrix = torch.randn(shape)
    result = orthogonalize(matrix)
    assert result.shape == matrix.shape and result.dtype == matrix.dtype
    singular = torch.linalg.svdvals(result)
    assert singular.min() > 0.5 and singular.max() < 1.3  # all pushed close to 1
    # an ill-conditioned matrix (singular values over three decades) comes out far flatter
    skewed = matrix @ torch.diag(torch.logspace(-2, 1, shape[1]))
    before, after = torch.linalg.svdvals(skewed), torch.linalg.svdvals(orthogonalize(skewed))
    assert after.max() / after.min() < (before.max() / before.min()) / 10
    stacked = orthogonalize(torch.stack([matrix, skewed]))  # a stack: each on its own
    assert torch.allclose(stacked[0], result, atol=1e-6) and torch.allclose(stacked[1], orthogonalize(skewed))


def test_newton_schulz_runs_in_bfloat16_only_where_it_is_fast():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert newton_schulz_dtype(cpu, torch.float32) == torch.float32  # emulated bf16 is slow on most CPUs
    assert newton_schulz_dtype(cpu, torch.bfloat16) == torch.bfloat16
    assert newton_schulz_dtype(cuda, torch.float32) == torch.bfloat16
    matrix = torch.randn(48, 40)
    exact, rounded = orthogonalize(matrix, dtype=torch.float32), orthogonalize(matrix)
    assert exact.dtype == rounded.dtype == torch.float32
    assert 0 < (exact - rounded).abs().max() < 0.05  # bf16 rounds, but lands close
    model = torch.nn.Module()
    model.blocks = torch.nn.Linear(4, 4)
    optimizer = make_optimizer(model, TrainingConfig(optimizer="muon"), cpu, torch.float32)
    assert optimizer.newton_schulz_dtype == torch.float32


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = GPT(tiny_model_config(bias=True))
    optimizer = make_optimizer(model, TrainingConfig(optimizer="muon", muon_lr=0.03, lr=0.001),
                               torch.device("cpu"))
    hidden, embeddings, others = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert hidden["muon"] and hidden["lr"] == 0.03 and hidden["weight_decay"] == 0.0
    assert sorted(names[id(p)].split(".", 2)[2] for p in hidden["params"])[:4] == [
        "attn.c_attn.weight", "attn.c_attn.weight", "attn.c_proj.weight", "attn.c_proj.weight"]
    assert all(names[id(p)].startswith("blocks.") and p.dim() == 2 for p in hidden["params"])
    assert [names[id(p)] for p in embeddings["params"]] == ["wte.weight", "wpe.weight"]  # head: tied
    assert not embeddings["muon"] and embeddings["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in others["params"]) and others["weight_decay"] == 0.0
    total = sum(len(g["params"]) for g in optimizer.param_groups)
    assert total == len(list(model.parameters()))
    set_learning_rates(optimizer, 0.5)
    assert [g["lr"] for g in optimizer.param_groups] == [0.015, 0.0005, 0.0005]


def test_the_adamw_half_matches_torch_adamw():
    torch.manual_seed(0)
    ours = GPT(tiny_model_config(bias=True))
    reference = copy.deepcopy(ours)
    settings = dict(lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=1.0)  # decay visible
    mine = MuonWithAdamW([{"params": list(ours.parameters()), "weight_decay": 1.0, "lr": 0.01}],
                         betas=(0.9, 0.95))
    theirs = torch.optim.AdamW(reference.parameters(), foreach=False, **settings)
    for _ in range(3):
        x = torch.randint(0, 11, (4, 8))
        for model, optimizer in ((ours, mine), (reference, theirs)):
            optimizer.zero_grad()
            model(x, x)[1].backward()
            optimizer.step()
    for a, b in zip(ours.parameters(), reference.parameters()):
        # rounding differs where gradients are tiny; a wrong formula would differ by > 1e-4
        assert (a - b).abs().max() < 5e-5


def test_muon_runs_resume_exactly(workdir, tiny_config_file):
    flags = ["--config", str(tiny_config_file), "--training.optimizer", "muon",
             "--training.lr_decay_steps", "6"]
    assert train.main([*flags, "--out_dir", "straight"]) == 0
    assert train.main([*flags, "--out_dir", "split", "--max_steps", "3"]) == 0
    assert train.main([*flags, "--out_dir", "split", "--resume"]) == 0
    straight, split = (load_checkpoint(workdir / f"{d}/ckpt.pt") for d in ("straight", "split"))
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, split["model"][name]), name
    assert straight["losses"] == split["losses"]


def one_muon_step(model: torch.nn.Module, monkeypatch) -> tuple[dict[str, torch.Tensor], list[torch.Size]]:
    """Take one Muon step from random gradients; return each weight's change and the shapes of
    the stacks orthogonalised."""
    optimizer = make_optimizer(model, TrainingConfig(optimizer="muon", muon_lr=0.1, muon_momentum=0.9),
                               torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    stacks = []
    monkeypatch.setattr(muon, "orthogonalize",
                        lambda matrices, **kw: stacks.append(matrices.shape) or orthogonalize(matrices, **kw))
    optimizer.step()
    return {name: param.detach() - before[name] for name, param in model.named_parameters()}, stacks


def expected_muon_change(grad: torch.Tensor, rows: tuple[int, ...]) -> torch.Tensor:
    """-lr x the orthogonalised first-step momentum of each matrix stacked in `grad` (Nesterov:
    grad + 0.9 x grad), scaled up for a tall one."""
    parts = (grad * 1.9).split(rows)
    return -0.1 * torch.cat([orthogonalize(m, dtype=torch.float32) * max(1, m.size(0) / m.size(1)) ** 0.5
                             for m in parts])


@pytest.mark.parametrize("n_kv_head", [None, 1], ids=["multi-head", "grouped-query"])
def test_muon_orthogonalises_the_fused_queries_keys_and_values_apart(n_kv_head, monkeypatch):
    model = GPT(tiny_model_config(n_head=2, n_kv_head=n_kv_head))  # 16 wide: k and v 8 rows with GQA
    kv = 16 if n_kv_head is None else 8
    changes, stacks = one_muon_step(model, monkeypatch)
    attention = model.blocks[0].attn
    torch.testing.assert_close(changes["blocks.0.attn.c_attn.weight"],
                               expected_muon_change(attention.c_attn.weight.grad, (16, kv, kv)))
    torch.testing.assert_close(changes["blocks.0.attn.c_proj.weight"],  # a plain matrix stays whole
                               expected_muon_change(attention.c_proj.weight.grad, (16,)))
    distinct = {(16, 16), (kv, 16), (16, 64)}  # q, k, v and c_proj; the MLP's two (one tall, as its transpose)
    assert sorted(shape[1:] for shape in stacks) == sorted(distinct)  # one batched call per shape

    # a model of one's own, with q, k and v in one matrix too: Muon cannot know, so it stays whole
    users = load_class(f"{REPO_ROOT / 'examples' / 'my_gpt.py'}:MyGPT")(tiny_model_config())
    changes, _ = one_muon_step(users, monkeypatch)
    weight = users.blocks[0].attention.query_key_value.weight
    torch.testing.assert_close(changes["blocks.0.attention.query_key_value.weight"],
                               expected_muon_change(weight.grad, (48,)))


class CountOps(TorchDispatchMode):
    """Counts the aten operations dispatched (on a GPU, each a kernel launch, or a view)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(optimizer_name: str, n_layer: int) -> int:
    """The operations of one optimizer step after the first (which creates the state)."""
    model = GPT(tiny_model_config(n_layer=n_layer))
    optimizer = make_optimizer(model, TrainingConfig(optimizer=optimizer_name), torch.device("cpu"))
    for step in range(2):
        for param in model.parameters():
            param.grad = torch.randn_like(param)
        with CountOps() as ops:
            optimizer.step()
    return ops.count


def test_an_update_step_costs_as_many_operations_whatever_the_depth():
    """O(shapes), not O(parameters): Muon updates each layer's weights of all blocks as one stack."""
    counts = {name: [ops_per_step(name, n_layer) for n_layer in (2, 6)] for name in ("adamw", "muon")}
    assert counts["adamw"][0] == counts["adamw"][1] < 40  # fused AdamW: one kernel per group
    assert counts["muon"][0] == counts["muon"][1] < 250  # the step this replaced ran 500-650


@pytest.mark.parametrize("optimizer_name", ["adamw", "muon"])
def test_a_step_marked_found_inf_changes_nothing(optimizer_name):
    """What optimizer_step does with a non-finite gradient, without reading it on the host."""
    torch.manual_seed(0)
    model = GPT(tiny_model_config())
    optimizer = make_optimizer(model, TrainingConfig(optimizer=optimizer_name, weight_decay=0.5), torch.device("cpu"))
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    optimizer.step()  # the state exists
    before = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    for param in model.parameters():
        param.grad = torch.full_like(param, float("nan"))
    optimizer.found_inf = torch.ones(())
    optimizer.step()
    del optimizer.found_inf
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[0][name]), name
    for index, moments in optimizer.state_dict()["state"].items():
        for key, value in moments.items():
            assert torch.equal(value, before[1]["state"][index][key]), (index, key)


def test_muon_momentum_over_two_steps(monkeypatch):
    """Nesterov momentum as in Muon's reference: buffer = m buffer + g; update from g + m buffer."""
    model = GPT(tiny_model_config())
    optimizer = make_optimizer(model, TrainingConfig(optimizer="muon", muon_lr=0.1, muon_momentum=0.9),
                               torch.device("cpu"), torch.float32)
    weight = model.blocks[1].attn.c_proj.weight
    torch.manual_seed(0)
    grads = [torch.randn_like(weight) for _ in range(2)]
    for grad in grads:
        for param in model.parameters():
            param.grad = torch.zeros_like(param)
        weight.grad = grad.clone()
        before = weight.detach().clone()
        optimizer.step()
    buffer = 0.9 * grads[0] + grads[1]
    expected = -0.1 * orthogonalize(grads[1] + 0.9 * buffer, dtype=torch.float32)
    torch.testing.assert_close(weight.detach() - before, expected)
    torch.testing.assert_close(optimizer.state[weight]["momentum_buffer"], buffer)


def test_a_muon_state_from_before_the_fused_adamw_kernel_loads(tmp_path):
    """Checkpoints written by the per-parameter MuonWithAdamW hold an int "step": they still resume."""
    torch.manual_seed(0)
    models = [GPT(tiny_model_config()) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [make_optimizer(m, TrainingConfig(optimizer="muon"), torch.device("cpu"), torch.float32)
                  for m in models]
    grads = [torch.randn_like(p) for p in models[0].parameters()]
    for model, optimizer in zip(models, optimizers):
        for param, grad in zip(model.parameters(), grads):
            param.grad = grad.clone()
        optimizer.step()
    old = copy.deepcopy(optimizers[0].state_dict())
    for moments in old["state"].values():
        if "step" in moments:
            moments["step"] = int(moments["step"])  # as today's checkpoints hold it
    torch.save(old, tmp_path / "old.pt")
    optimizers[1].load_state_dict(torch.load(tmp_path / "old.pt", weights_only=True))
    steps = [s["step"] for s in optimizers[1].state.values() if "step" in s]
    assert steps and all(s.dtype == torch.float32 and s.item() == 1 for s in steps)
    for model, optimizer in zip(models, optimizers):  # both continue alike
        for param, grad in zip(model.parameters(), grads):
            param.grad = grad.clone()
        optimizer.step()
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b)


class HostReads(TorchDispatchMode):
    """Counts .item(), bool() and int() on tensors: on a GPU, the host waiting for the device."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("optimizer_name", ["adamw", "muon"])
def test_loss_scaling_skips_an_overflow_on_the_device(optimizer_name):
    """fp16: GradScaler's overflow check and scale update, and the skip, without a host read."""
    torch.manual_seed(0)
    model = GPT(tiny_model_config())
    optimizer = make_optimizer(model, TrainingConfig(optimizer=optimizer_name), torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    scaler.scale(torch.zeros(()))  # the scale exists once a loss has been scaled
    for overflow in (False, True, False):
        for param in model.parameters():
            param.grad = torch.randn_like(param) * scaler.get_scale()
        if overflow:
            next(model.parameters()).grad[0] = float("inf")
        before, scale = copy.deepcopy(model.state_dict()), scaler.get_scale()
        with HostReads() as reads:
            applied = optimizer_step(model, optimizer, scaler, grad_clip=1.0)
        assert reads.count == 0 and bool(applied) == (not overflow)
        unchanged = all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
        assert unchanged == overflow and scaler.get_scale() == (scale / 2 if overflow else scale)
