"""The GPT itself: shapes, causality, initialisation, counting, gradients, learning, sampling."""
from __future__ import annotations

import math

import pytest
import torch

from config import TrainingConfig
from model import GPT
from optim import accumulate_gradients, make_optimizer, optimizer_step
from tests.conftest import tiny_model_config


def build(seed: int = 0, **changes) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_model_config(**changes))


def test_output_shapes_and_loss():
    model = build()
    idx = torch.randint(0, 11, (3, 8))
    logits, loss = model(idx)
    assert logits.shape == (3, 8, 11) and loss is None
    logits, loss = model(idx, idx)
    assert loss.shape == () and torch.isfinite(loss)
    # at initialisation the model is close to uniform: loss near ln(vocab)
    assert abs(loss.item() - math.log(11)) < 0.5


def test_loss_is_cross_entropy_of_the_logits():
    model = build()
    idx, targets = torch.randint(0, 11, (2, 8)), torch.randint(0, 11, (2, 8))
    logits, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1))
    assert torch.allclose(loss, expected)


VARIANTS = [dict(position=p, norm=n, mlp=m) for p in ("learned", "rope") for n in ("layernorm", "rmsnorm")
            for m in ("gelu", "relu2", "swiglu", "geglu")]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v.values()))
def test_every_architecture_variant_is_causal_with_gradients_everywhere(variant):
    model = build(**variant).eval()
    idx = torch.randint(0, 11, (2, 8))
    changed = idx.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 11
    before, loss = model(idx)[0], model(idx, idx)[1]
    assert before.shape == (2, 8, 11) and torch.isfinite(loss)
    assert torch.allclose(before[:, :5], model(changed)[0][:, :5], atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("option", [dict(qk_norm=True), dict(tie_embeddings=False),
                                    dict(zero_init_projections=True), dict(n_kv_head=1),
                                    dict(loss_chunk_size=5)], ids=lambda o: next(iter(o)))
def test_recipe_options_are_causal_with_gradients_everywhere(option):
    test_every_architecture_variant_is_causal_with_gradients_everywhere(option)


def test_grouped_query_attention_shares_key_value_heads():
    gqa = build(n_head=4, n_kv_head=2, n_embd=16)
    # q keeps n_embd columns; k and v each shrink to n_kv_head * head_size = 2 * 4
    assert gqa.blocks[0].attn.c_attn.weight.shape == (16 + 2 * 8, 16)
    full = build(n_head=4, n_embd=16)
    # 2 layers x (k, v) x 8 fewer output rows x (16 weights + 1 bias)
    assert full.num_params() - gqa.num_params() == 2 * 2 * 8 * (16 + 1)
    # with the key/value heads repeated, grouped attention equals full attention
    attn = gqa.blocks[0].attn
    wq, wk, wv = attn.c_attn.weight.split((16, 8, 8))
    bq, bk, bv = attn.c_attn.bias.split((16, 8, 8))
    repeat = lambda t: t.view(2, 4, -1).repeat_interleave(2, dim=0).reshape(16, *t.shape[1:])  # noqa: E731
    full_attn = full.blocks[0].attn
    with torch.no_grad():
        full_attn.c_attn.weight.copy_(torch.cat((wq, repeat(wk), repeat(wv))))
        full_attn.c_attn.bias.copy_(torch.cat((bq, repeat(bk), repeat(bv))))
        full_attn.c_proj.load_state_dict(attn.c_proj.state_dict())
    x = torch.randn(2, 8, 16)
    assert torch.allclose(attn(x), full_attn(x), atol=1e-6)


def test_geglu_gates_with_the_tanh_gelu():
    model = build(mlp="geglu")
    mlp = model.blocks[0].mlp
    x = torch.randn(3, 16)
    gate, value = mlp.c_fc(x).chunk(2, dim=-1)
    expected = mlp.c_proj(torch.nn.functional.gelu(gate, approximate="tanh") * value)
    assert torch.allclose(mlp(x), expected, atol=1e-6)
    assert model.num_params() == build(mlp="swiglu").num_params()


@pytest.mark.parametrize("chunk", [1, 5, 16, 100])
def test_chunked_loss_equals_the_whole_loss_with_the_same_gradients(chunk):
    whole, chunked = build(), build(loss_chunk_size=chunk)
    chunked.load_state_dict(whole.state_dict())
    idx, targets = torch.randint(0, 11, (2, 8)), torch.randint(0, 11, (2, 8))
    _, loss_whole = whole(idx, targets)
    logits, loss_chunked = chunked(idx, targets)
    assert logits is None  # the point: the full logits are never built
    assert torch.allclose(loss_whole, loss_chunked, atol=1e-6)
    loss_whole.backward()
    loss_chunked.backward()
    for (name, a), b in zip(whole.named_parameters(), chunked.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
    assert chunked(idx)[0].shape == (2, 8, 11)  # without targets the logits come back


def test_untied_head_and_zero_initialised_projections():
    tied, untied = build(), build(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.wte.weight
    assert untied.num_params() == tied.num_params() + 11 * 16  # a second vocab x n_embd matrix
    assert untied.flops_per_token() == tied.flops_per_token()  # the new matrix only replaces a lookup
    zero = build(zero_init_projections=True)
    assert all(torch.all(b.attn.c_proj.weight == 0) and torch.all(b.mlp.c_proj.weight == 0)
               for b in zero.blocks)
    idx = torch.randint(0, 11, (2, 8))
    logits = zero.eval()(idx)[0]  # every block starts as the identity
    direct = zero.lm_head(zero.ln_f(zero.wte(idx) + zero.wpe(torch.arange(8))))
    assert torch.allclose(logits, direct, atol=1e-6)


def test_rope_makes_attention_depend_on_relative_position():
    """With rotary positions the same token pair scores the same wherever it stands."""
    from model import apply_rotary, rotary_tables

    rotary = rotary_tables(16, 8)
    q = torch.randn(1, 1, 1, 8).expand(1, 1, 16, 8)
    k = torch.randn(1, 1, 1, 8).expand(1, 1, 16, 8)
    rq, rk = apply_rotary(q, rotary), apply_rotary(k, rotary)
    scores = (rq @ rk.transpose(-2, -1))[0, 0]  # (16, 16)
    assert torch.allclose(scores[5, 3], scores[12, 10], atol=1e-5)  # both 2 apart
    assert not torch.allclose(scores[5, 3], scores[5, 1], atol=1e-3)
    assert torch.allclose(rq.norm(dim=-1), q.norm(dim=-1), atol=1e-5)  # a rotation keeps lengths


def test_later_tokens_never_change_earlier_logits():
    model = build().eval()
    idx = torch.randint(0, 11, (2, 8))
    changed = idx.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 11
    before, _ = model(idx)
    after, _ = model(changed)
    assert torch.allclose(before[:, :5], after[:, :5], atol=1e-6)
    assert not torch.allclose(before[:, 5:], after[:, 5:])


def test_too_long_input_is_refused():
    with pytest.raises(ValueError, match="longer than block_size 8"):
        build()(torch.zeros(1, 9, dtype=torch.long))


def test_same_seed_same_model_and_outputs():
    a, b, c = build(seed=1), build(seed=1), build(seed=2)
    idx = torch.randint(0, 11, (2, 8))
    assert torch.equal(a(idx)[0], b(idx)[0])
    assert not torch.equal(a(idx)[0], c(idx)[0])


@pytest.mark.parametrize("bias", [True, False])
def test_parameter_count_matches_the_formula(bias):
    model = build(bias=bias, n_layer=3, n_embd=24, n_head=4, block_size=10, vocab_size=50)
    V, T, C, L = 50, 10, 24, 3
    per_block = 12 * C * C + (13 * C if bias else 2 * C)  # 4 matrices; LayerNorms and biases
    final_ln = 2 * C if bias else C
    expected = V * C + T * C + L * per_block + final_ln  # the tied head adds nothing
    assert model.num_params() == expected
    assert model.num_params(include_embeddings=False) == expected - V * C - T * C
    assert model.flops_per_token() == 6 * (expected - T * C) + 12 * L * C * T


def test_parameter_count_of_the_llama_like_variant():
    model = build(bias=False, n_layer=3, n_embd=24, n_head=4, block_size=10, vocab_size=50,
                  position="rope", norm="rmsnorm", mlp="swiglu")
    V, C, L, hidden = 50, 24, 3, 64  # 8 * 24 / 3 = 64, already a multiple of 32
    per_block = 4 * C * C + 3 * C * hidden + 2 * C  # attention, SwiGLU, two RMSNorm gains
    expected = V * C + L * per_block + C  # no position embeddings with RoPE
    assert model.num_params() == expected
    assert model.num_params(include_embeddings=False) == expected - V * C
    assert model.flops_per_token() == 6 * expected + 12 * L * C * 10


def test_gpt2_initialisation_scales_residual_projections():
    model = build(n_layer=8, n_embd=64, n_head=4)
    assert model.lm_head.weight is model.wte.weight
    assert abs(model.blocks[0].attn.c_attn.weight.std().item() - 0.02) < 0.002
    residual = torch.cat([b.mlp.c_proj.weight.flatten() for b in model.blocks])
    assert abs(residual.std().item() - 0.02 / math.sqrt(16)) < 0.001
    assert torch.all(model.blocks[0].attn.c_attn.bias == 0)


def test_gradcheck_on_a_tiny_float64_model():
    model = build(n_layer=1, n_embd=4, n_head=2, block_size=4, vocab_size=5).double()
    idx, targets = torch.randint(0, 5, (2, 4)), torch.randint(0, 5, (2, 4))
    names = [name for name, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())

    def loss_of(*values):
        return torch.func.functional_call(model, dict(zip(names, values)), (idx, targets))[1]

    assert torch.autograd.gradcheck(loss_of, params, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("variant, optimizer_name", [
    ({}, "adamw"), (dict(position="rope", norm="rmsnorm", mlp="swiglu"), "adamw"), ({}, "muon")],
    ids=["gpt2-adamw", "llama-like-adamw", "gpt2-muon"])
def test_overfits_one_batch(variant, optimizer_name):
    model = build(n_layer=2, n_embd=32, n_head=2, block_size=16, vocab_size=20, **variant)
    settings = TrainingConfig(lr=1e-2, weight_decay=0.0, optimizer=optimizer_name)
    optimizer = make_optimizer(model, settings, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    torch.manual_seed(0)
    x, y = torch.randint(0, 20, (4, 16)), torch.randint(0, 20, (4, 16))
    losses = []
    for _ in range(50):
        loss = accumulate_gradients(model, [(x, y)], 1, torch.autocast("cpu", enabled=False), scaler)
        assert optimizer_step(model, optimizer, scaler, grad_clip=1.0)
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 2


def test_plain_attention_matches_the_fused_kernel():
    fused = build(n_layer=2, n_embd=32, n_head=4, block_size=8)
    plain = build(n_layer=2, n_embd=32, n_head=4, block_size=8, flash_attention=False)
    plain.load_state_dict(fused.state_dict())
    idx = torch.randint(0, 11, (3, 8))
    logits_fused, loss_fused = fused(idx, idx)
    logits_plain, loss_plain = plain(idx, idx)
    assert torch.allclose(logits_fused, logits_plain, atol=1e-5)
    loss_fused.backward()
    loss_plain.backward()
    for a, b in zip(fused.parameters(), plain.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)


@pytest.mark.parametrize("variant", [{}, dict(position="rope", norm="rmsnorm", mlp="relu2", qk_norm=True),
                                     dict(mlp="geglu", n_kv_head=1)],
                         ids=["gpt2", "cpu-recipe", "geglu-gqa"])
def test_the_training_forward_compiles_without_graph_breaks(variant):
    """torch.compile gets one whole graph: dynamo's explain finds no break (tracing only)."""
    model = build(**variant)
    idx = torch.randint(0, 11, (2, 8))
    explanation = torch._dynamo.explain(model)(idx, idx)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
