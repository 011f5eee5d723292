"""losses.py: the chunked head and cross-entropy equal the whole one, and never hold all the logits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from losses import IGNORE_INDEX, chunked_cross_entropy
from model import GPT
from tests.conftest import tiny_model_config


def masked(targets: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The targets with about half ignored, as chat data masks the user's turns."""
    out = targets.clone()
    out[torch.rand(targets.shape, generator=generator) < 0.5] = IGNORE_INDEX
    return out


def pair(loss_chunk_size: int, **changes) -> tuple[GPT, GPT]:
    """Two GPTs with the same weights, the second computing its loss in chunks."""
    torch.manual_seed(0)
    whole = GPT(tiny_model_config(**changes))
    chunked = GPT(tiny_model_config(**changes, loss_chunk_size=loss_chunk_size))
    chunked.load_state_dict(whole.state_dict())
    return whole, chunked


@pytest.mark.parametrize("chunk", [1, 5, 7, 16, 100])  # 2 x 8 = 16 positions: 5 and 7 leave a short last chunk
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("mask", [False, True])
def test_the_loss_and_every_gradient_equal_the_whole_head(chunk, tied, mask):
    torch.manual_seed(1)
    whole = GPT(tiny_model_config(tie_embeddings=tied))
    chunked = GPT(tiny_model_config(tie_embeddings=tied, loss_chunk_size=chunk))
    chunked.load_state_dict(whole.state_dict())
    generator = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 11, (2, 8), generator=generator)
    targets = torch.randint(0, 11, (2, 8), generator=generator)
    if mask:
        targets = masked(targets, generator)
        targets[0] = IGNORE_INDEX  # whole chunks with nothing to count
    whole_logits, whole_loss = whole(idx, targets)
    logits, loss = chunked(idx, targets)
    assert logits is None  # the point: the tokens x vocabulary logits are never built
    expected = F.cross_entropy(whole_logits.reshape(-1, 11), targets.reshape(-1))  # the contract's mean
    assert torch.allclose(loss, expected, atol=1e-6) and torch.allclose(loss, whole_loss, atol=1e-6)
    whole_loss.backward()
    loss.backward()
    for (name, a), b in zip(whole.named_parameters(), chunked.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
    assert chunked.lm_head.weight.grad.abs().sum() > 0


def test_the_function_equals_cross_entropy_of_the_linear_layer_and_scales_with_the_upstream_gradient():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(13, 6, generator=generator, requires_grad=True)
    weight = torch.randn(9, 6, generator=generator, requires_grad=True)
    targets = masked(torch.randint(0, 9, (13,), generator=generator), generator)
    expected = F.cross_entropy(F.linear(hidden, weight), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    (3 * expected).backward()
    wanted = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    summed = chunked_cross_entropy(hidden, weight, targets, 4)
    assert torch.allclose(summed, expected, atol=1e-5)
    (3 * summed).backward()  # the backward pass multiplies by what comes from above
    assert torch.allclose(hidden.grad, wanted[0], atol=1e-5) and torch.allclose(weight.grad, wanted[1], atol=1e-5)
    with torch.no_grad():  # evaluation: only the loss
        assert torch.allclose(chunked_cross_entropy(hidden, weight, targets, 4), expected, atol=1e-5)
    nothing = torch.full((13,), IGNORE_INDEX)
    hidden.grad = None
    chunked_cross_entropy(hidden, weight, nothing, 4).backward()
    assert hidden.grad.abs().sum() == 0  # a target that does not count pulls on nothing


class LargestTensor(TorchDispatchMode):
    """Record the most elements of any tensor an operation returns, backward pass included."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.elements = max(self.elements, tensor.numel())
        return out


def largest_tensor_of_a_step(model: GPT, idx: torch.Tensor) -> int:
    with LargestTensor() as mode:
        model(idx, idx)[1].backward()
    return mode.elements


def test_on_a_large_vocabulary_no_tensor_the_size_of_all_logits_exists():
    vocab, batch, length, chunk = 4096, 4, 32, 16  # logits: 128 positions x 4096 = 524k numbers
    whole, chunked = pair(vocab_size=vocab, block_size=length, loss_chunk_size=chunk)
    idx = torch.randint(0, vocab, (batch, length))
    all_logits = batch * length * vocab
    assert largest_tensor_of_a_step(whole, idx) >= all_logits
    # a chunk's logits (16 x 4096) or the head's weight gradient (4096 x 16), 8x less than all
    assert largest_tensor_of_a_step(chunked, idx) <= max(chunk * vocab, vocab * 16) == all_logits // 8


def test_bfloat16_autocast_stays_close_to_the_whole_head():
    whole, chunked = pair(loss_chunk_size=3)
    idx = torch.randint(0, 11, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        whole_loss, chunked_loss = whole(idx, idx)[1], chunked(idx, idx)[1]
    assert chunked_loss.dtype == torch.float32
    assert torch.allclose(chunked_loss, whole_loss, atol=2e-2)
    whole_loss.backward()
    chunked_loss.backward()
    for a, b in zip(whole.parameters(), chunked.parameters()):
        assert a.grad.dtype == b.grad.dtype == torch.float32
        assert torch.allclose(a.grad, b.grad, atol=2e-2, rtol=5e-2)


def test_the_chunked_loss_compiles_in_one_graph_with_the_same_gradients():
    whole, chunked = pair(loss_chunk_size=5)
    idx = torch.randint(0, 11, (2, 8))
    explanation = torch._dynamo.explain(chunked)(idx, idx)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(chunked, backend="aot_eager", fullgraph=True)  # autograd traced as inductor does
    loss = compiled(idx, idx)[1]
    loss.backward()
    whole_loss = whole(idx, idx)[1]
    whole_loss.backward()
    assert torch.allclose(loss, whole_loss, atol=1e-6)
    for a, b in zip(whole.parameters(), chunked.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_chunked_head_holds_less_memory_and_matches():
    torch.manual_seed(0)
    cfg = dict(vocab_size=50304, n_embd=256, n_head=4, block_size=256, n_layer=1)
    whole, chunked = (m.cuda() for m in pair(**cfg, loss_chunk_size=256))  # 8 chunks of the 2048 positions
    idx = torch.randint(0, 50304, (8, 256), device="cuda")
    peaks, losses = [], []
    for model in (whole, chunked):
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(idx, idx)[1]
        loss.backward()
        peaks.append(torch.cuda.max_memory_allocated())
        losses.append(loss.item())
    assert peaks[1] < peaks[0] / 2
    assert losses[1] == pytest.approx(losses[0], abs=2e-2)
