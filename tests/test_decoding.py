"""Fast decoding: samples decoded as one batch, int8 weights (quantize.py), and the static
one-token step compiled (decode_step.py; its CUDA-graph form is tested in tests/test_gpu.py)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import batching
import eval as evaluate
import gen
import serve
from api_requests import Sampling
from batching import FINISHED, Job, Work
from checkpoint import save_checkpoint
from cli import run_cli
from config import Config, config_to_dict
from decode_step import StaticSteps, resolve_decode_step
from model import GPT
from quantize import Int8Linear, apply_quantization
from sampling import SamplingSettings, generate, generate_batch
from tests.conftest import cached_and_full_logits, tiny_model_config
from tokenizer import CharTokenizer


def build(**changes) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_model_config(block_size=16, n_head=4, n_embd=32, **changes)).eval()


@pytest.mark.parametrize("temperature", [0.0, 1.5])
def test_a_batch_of_samples_gives_each_sample_as_decoded_alone(temperature):
    model = build(position="rope")
    settings = SamplingSettings(max_new_tokens=30, temperature=temperature, top_k=None)  # 3 + 30 > 16: slides
    seeds = [4, 5, 6]
    alone = [list(generate(model, 16, [1, 2, 3], settings, 11, generator=torch.Generator().manual_seed(s)))
             for s in seeds]
    steps = list(generate_batch(model, 16, [1, 2, 3], settings, 11, [torch.Generator().manual_seed(s) for s in seeds]))
    together = [[step[row] for step in steps] for row in range(3)]
    assert together == alone and len(steps) == 30
    if temperature:
        assert alone[0] != alone[1]  # the seeds do differ, so the comparison means something


def test_a_sample_that_ends_early_yields_none_while_the_others_go_on():
    model = build()
    greedy = SamplingSettings(max_new_tokens=12, temperature=0)
    reference = list(generate(model, 16, [1, 2, 3], greedy, 11))
    stop = reference[4]
    steps = list(generate_batch(model, 16, [1, 2, 3], greedy, 11, [None, None], stop_ids=frozenset({stop})))
    first = [step[0] for step in steps]
    assert first[: reference.index(stop)] == reference[: reference.index(stop)]
    assert all(token is None for token in first[reference.index(stop):])
    assert steps == [] or len(steps) == reference.index(stop)  # every row ended: decoding stops


def test_int8_weights_stay_close_to_the_float_ones_and_keep_the_head_usable():
    model = build(position="rope", mlp="swiglu")
    tokens = torch.randint(0, 11, (2, 16))
    with torch.no_grad():
        float_logits = model(tokens)[0]
        linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
        apply_quantization(model, "int8")
        int8_logits = model(tokens)[0]
        assert sum(isinstance(m, Int8Linear) for m in model.modules()) == linears
        assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
        assert model.wte.weight.dtype == torch.float32  # the embedding lookup stays float
        head = model.lm_head
        assert head.weight_int8.dtype == torch.int8
        error = (head.weight - model.wte.weight).abs().max() / model.wte.weight.abs().max()
        assert 0 < error <= 1 / 254 + 1e-6  # half a step of 127 levels, and really rounded
        # bfloat16 activations into the fused kernel: about 2-3 significant digits
        torch.testing.assert_close(int8_logits, float_logits, atol=0.05, rtol=0.05)


@pytest.fixture(scope="module")
def char_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("int8") / "ckpt.pt"
    tokenizer = CharTokenizer("\n abcdefghijklmnopqrstuvwxyz")
    cfg = tiny_model_config(block_size=32, vocab_size=32, n_embd=32, n_head=4)
    torch.manual_seed(0)
    save_checkpoint({"model": GPT(cfg).state_dict(), "config": config_to_dict(Config(model=cfg)),
                     "tokenizer": tokenizer.to_dict(), "step": 0}, path)
    return path


def test_gen_and_eval_take_int8_and_a_batch_of_samples(char_checkpoint, tmp_path, capsys):
    base = [str(char_checkpoint), "--device", "cpu", "--prompt", "ab", "--max_new_tokens", "12", "--seed", "3"]
    assert run_cli(gen.main, [*base, "--num_samples", "3", "--no_stream"]) == 0
    three = capsys.readouterr().out.split(gen.SAMPLE_SEPARATOR + "\n")
    assert run_cli(gen.main, [*base[:-1], "5"]) == 0  # sample 3 of 3 is the one seed 3 + 2 gives
    assert capsys.readouterr().out == three[2] and len(three) == 3
    assert run_cli(gen.main, [*base, "--quantize", "int8", "--benchmark", "--num_samples", "2"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["quantize"] == "int8" and record["samples"] == 2 and record["decode_tokens_per_s"] > 0
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 4)
    perplexities = []
    for quantize in ("none", "int8"):
        assert run_cli(evaluate.main, [str(char_checkpoint), "--text", str(text), "--json", "--device", "cpu",
                                       "--quantize", quantize]) == 0
        perplexities.append(json.loads(capsys.readouterr().out)["perplexity"])
    assert perplexities[0] == pytest.approx(perplexities[1], rel=0.02)


def test_the_benchmark_repeats_rounds_and_compares_two_steps(char_checkpoint, capsys):
    base = [str(char_checkpoint), "--device", "cpu", "--prompt", "ab", "--max_new_tokens", "12", "--benchmark"]
    assert run_cli(gen.main, [*base, "--rounds", "3", "--compare_step", "eager"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert len(record["rounds"]) == 3 and record["decode_tokens_per_s"] == sorted(record["rounds"])[1]
    assert record["compare_step"] == "eager" and record["compare_decode_tokens_per_s"] > 0 and record["speedup"] > 0
    assert run_cli(gen.main, [*base, "--rounds", "0"]) == 2
    assert "--rounds must be at least 1" in capsys.readouterr().err


def test_an_unknown_quantization_is_refused_in_one_line(char_checkpoint, capsys):
    assert run_cli(gen.main, [str(char_checkpoint), "--quantize", "int4"]) == 2
    err = capsys.readouterr().err
    assert "--quantize" in err and "int8" in err and "Traceback" not in err


VARIANTS = [{}, dict(position="rope", norm="rmsnorm", qk_norm=True), dict(n_kv_head=1, mlp="swiglu"),
            dict(flash_attention=False)]


@pytest.mark.parametrize("variant", VARIANTS, ids=["gpt2", "rope", "gqa", "unfused"])
def test_a_static_cache_gives_the_logits_of_the_whole_context(variant):
    model = build(**variant)
    tokens = torch.randint(0, 11, (1, 16), generator=torch.Generator().manual_seed(1))
    cached, full, cache = cached_and_full_logits(model, tokens, static=True)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    assert int(cache.length) == 16 and cache.layers[0].keys.shape == (1, model.config.n_kv_head or 4, 16, 8)
    cache.reset()  # stale slots past the new length must stay hidden
    with torch.no_grad():
        again, fresh = model(tokens[:, :3], cache=cache)[0][0, -1], model(tokens[:, :3])[0][0, -1]
    torch.testing.assert_close(again, fresh, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS, ids=["gpt2", "rope", "gqa", "unfused"])
def test_rows_of_a_static_cache_stand_at_their_own_lengths(variant):
    model = build(**variant)
    tokens = torch.randint(0, 11, (2, 16), generator=torch.Generator().manual_seed(2))
    cache = model.new_static_cache(2)
    with torch.no_grad():
        for row, length in ((0, 3), (1, 7)):  # each row prefilled alone, into the shared buffers
            model(tokens[row : row + 1, :length], cache=cache.rows(row, row + 1))
        steps = [model(torch.stack([tokens[0, 3 + t], tokens[1, 7 + t]])[:, None], cache=cache)[0][:, -1]
                 for t in range(8)]
        full = model(tokens)[0]
    assert cache.length.tolist() == [11, 15]
    for t, logits in enumerate(steps):
        torch.testing.assert_close(logits, torch.stack([full[0, 3 + t], full[1, 7 + t]]), atol=1e-5, rtol=1e-5)


def test_a_compiled_step_decodes_what_eager_does_and_compiles_once():
    model = build(position="rope")
    greedy = SamplingSettings(max_new_tokens=30, temperature=0)  # 3 + 30 > 16: the context slides
    eager = [list(generate(model, 16, prompt, greedy, 11)) for prompt in ([1, 2, 3], [4, 5])]
    steps = StaticSteps(model, "compiled")
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):  # a second compilation raises
            compiled = [list(generate(model, 16, prompt, greedy, 11, steps=steps)) for prompt in ([1, 2, 3], [4, 5])]
    finally:
        torch._dynamo.reset()
    assert compiled == eager and len(eager[0]) == 30
    assert steps.by_batch[1].prepare_s > 0  # the first step compiled


def serve_jobs(engine: serve.Engine, jobs: list) -> list[str]:
    """Queue the jobs, let the engine generate until every one has FINISHED; return their texts."""
    pieces: list[list] = [[] for _ in jobs]
    for job, out in zip(jobs, pieces):
        engine.runner.jobs.put(Work(job, out.append))
    engine.runner.run_until(stopped=lambda: all(out and out[-1] is FINISHED for out in pieces))
    for out in pieces:
        assert not any(isinstance(piece, Exception) for piece in out), out
    return ["".join(out[:-1]) for out in pieces]


SERVED = [("abc", 0.0, 5, 30), ("j", 1.0, 6, 40), ("abcdefghij" * 2, 0.8, 7, 12), ("ba", 1.2, 8, 25)]  # 3 slide


def served_jobs(engine: serve.Engine, tokenizer: CharTokenizer) -> list:
    return [engine._job(tokenizer.encode(prompt), Sampling(max_tokens=tokens, temperature=temperature, seed=seed),
                        frozenset()) for prompt, temperature, seed, tokens in SERVED]


def test_the_server_prepares_a_compiled_step_before_the_first_request_and_replies_as_eager():
    model = build(position="rope")  # the model of the test above: inductor's cache serves this one
    tokenizer = CharTokenizer("abcdefghij\n")
    engines = [serve.Engine(model, tokenizer, 16, "tiny", steps) for steps in (None, StaticSteps(model, "compiled"))]
    engines[1].runner.prepare()
    assert engines[1].runner.steps.by_batch[1].run is not None  # compiled before any request
    texts = [serve_jobs(engine, served_jobs(engine, tokenizer)[:1]) for engine in engines]
    assert texts[0] == texts[1] and len(texts[0][0]) == 30


@pytest.mark.parametrize("kind", ["eager", "compiled"])
def test_a_batch_of_requests_gives_each_the_reply_it_gets_alone(kind):
    model = build(position="rope")
    tokenizer = CharTokenizer("abcdefghij\n")
    alone = serve.Engine(model, tokenizer, 16, "tiny")
    steps = StaticSteps(model, kind) if kind != "eager" else None
    batched = serve.Engine(model, tokenizer, 16, "tiny", steps, batch_size=3)  # 4 jobs: one waits for a row
    batched.runner.prepare()
    expected = [serve_jobs(alone, [job])[0] for job in served_jobs(alone, tokenizer)]
    jobs = served_jobs(batched, tokenizer)
    assert serve_jobs(batched, jobs) == expected
    assert [job.completion_tokens for job in jobs] == [tokens for *_, tokens in SERVED]
    assert batched.runner.batch.active == 0 and len(set(expected)) == 4


def test_requests_that_sample_alike_are_chosen_together_as_alone_with_a_repetition_penalty(monkeypatch):
    model = build(position="rope")
    tokenizer = CharTokenizer("abcdefghij\n")
    penalised = SamplingSettings(max_new_tokens=20, temperature=1.1, top_k=5, repetition_penalty=1.3)
    other = SamplingSettings(max_new_tokens=20, temperature=0.7)

    def jobs(settings: SamplingSettings) -> list[Job]:
        return [Job(tokenizer.encode(prompt), s, frozenset(), seed)
                for prompt, seed, s in (("abc", 1, settings), ("j", 2, settings), ("ba", 3, settings),
                                        ("ca", 4, other))]

    def served_alone(settings: SamplingSettings) -> list[str]:
        return [serve_jobs(serve.Engine(model, tokenizer, 16, "tiny"), [job])[0] for job in jobs(settings)]

    alone = served_alone(penalised)
    assert alone[:3] != served_alone(dataclasses.replace(penalised, repetition_penalty=1.0))[:3]  # it matters
    reads: list[int] = []
    real = batching.choose_tokens

    def counted(logits: torch.Tensor, *rest):
        reads.append(len(logits))
        return real(logits, *rest)

    monkeypatch.setattr(batching, "choose_tokens", counted)
    batched = serve.Engine(model, tokenizer, 16, "tiny", batch_size=4)
    assert serve_jobs(batched, jobs(penalised)) == alone and len(set(alone)) == 4
    assert reads == [3, 1] * 20  # each step: the three alike in one call, the other in its own


def test_a_request_that_fails_in_a_batch_fails_alone():
    model = build(position="rope")
    tokenizer = CharTokenizer("abcdefghij\n")
    for batch_size in (1, 3):
        engine = serve.Engine(model, tokenizer, 16, "tiny", batch_size=batch_size)
        good, bad, other = served_jobs(engine, tokenizer)[:3]
        bad.prompt_ids = [999, 1, 2]  # past the embedding's rows: its prefill raises
        pieces: list[list] = [[], [], []]
        for job, out in zip((good, bad, other), pieces):
            engine.runner.jobs.put(Work(job, out.append))
        engine.runner.run_until(stopped=lambda: all(out and out[-1] is FINISHED for out in pieces))
        assert isinstance(pieces[1][0], IndexError) and pieces[1][1:] == [FINISHED]
        assert good.completion_tokens == 30 and other.completion_tokens == 12, batch_size


def test_the_decode_step_is_chosen_by_device_and_refused_where_it_cannot_run(char_checkpoint, capsys):
    model = build()
    assert resolve_decode_step("auto", model, torch.device("cpu")) == "eager"
    assert resolve_decode_step("auto", model, torch.device("cuda")) == "cuda_graph"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_decode_step("cuda_graph", model, torch.device("cpu"))
    assert run_cli(gen.main, [str(char_checkpoint), "--device", "cpu", "--decode_step", "cuda_graph"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --decode_step: decode step cuda_graph needs a CUDA device") and "\n" not in err
