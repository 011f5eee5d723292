"""Generation: the KV cache against full recomputation, the filters, streaming text, chat."""
from __future__ import annotations

import io
import json

import pytest
import torch

import gen
from chat import escape_reply, reply_stop_ids, unescape_message
from checkpoint import load_checkpoint, load_model, save_checkpoint
from cli import run_cli
from config import Config, config_to_dict
from contract import has_kv_cache
from model import GPT
from sampling import (
    SamplingSettings,
    TextStream,
    choose_token,
    generate,
    keep_min_p,
    keep_top_k,
    keep_top_p,
    penalise_repetition,
)
from tests.conftest import cached_and_full_logits, tiny_model_config
from tokenizer import IM_END, IM_START, CharTokenizer, SentencePieceTokenizer

VARIANTS = [
    {}, dict(position="rope"), dict(flash_attention=False), dict(position="rope", flash_attention=False),
    dict(n_kv_head=1), dict(qk_norm=True, norm="rmsnorm", mlp="swiglu"), dict(mlp="geglu", position="rope"),
]


def build(**changes) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_model_config(block_size=16, n_head=4, n_embd=32, **changes)).eval()


def variant_id(variant: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in variant.items()) or "gpt2"


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_cached_decoding_gives_the_logits_of_full_recomputation(variant):
    model = build(**variant)
    tokens = torch.randint(0, 11, (1, 16))
    cached, full, cache = cached_and_full_logits(model, tokens)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="longer than block_size"):
        model(tokens[:, :1], cache=cache)  # the cache is full


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_greedy_tokens_equal_recomputing_the_context(variant):
    model = build(**variant)
    prompt = [1, 2, 3]
    greedy = SamplingSettings(max_new_tokens=12, temperature=0)  # 3 + 12 <= 16: no sliding yet
    cached = list(generate(model, 16, prompt, greedy, vocab_limit=11))
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            tokens.append(int(model(torch.tensor([tokens]))[0][0, -1].argmax()))
    assert cached == tokens[3:]


class WithoutCache(GPT):
    """A model without the optional KV-cache hooks, as a user's may be."""

    new_cache = None

    def forward(self, idx, targets=None):
        return super().forward(idx, targets)


def test_a_model_without_cache_hooks_recomputes_the_context_and_picks_the_same_tokens():
    torch.manual_seed(0)
    cached, plain = build(), WithoutCache(build().config)
    plain.load_state_dict(cached.state_dict())
    plain.eval()
    assert has_kv_cache(cached) and not has_kv_cache(plain)
    greedy = SamplingSettings(max_new_tokens=12, temperature=0)
    recomputed, from_cache = (list(generate(m, 16, [1, 2, 3], greedy, 11)) for m in (plain, cached))
    assert recomputed == from_cache
    longer = SamplingSettings(max_new_tokens=40, temperature=0)  # past the context: the last 16 tokens
    notices = []
    assert len(list(generate(plain, 16, [1, 2, 3], longer, 11, on_slide=lambda: notices.append(1)))) == 40
    assert notices == []  # nothing slides: every token sees the 16 before it


def test_half_precision_weights_decode_like_float32(chat_checkpoint):
    """gen.py converts the weights to the run's dtype once (no autocast per op)."""
    checkpoint = load_checkpoint(chat_checkpoint)
    greedy = SamplingSettings(max_new_tokens=5, temperature=0)
    full = load_model(checkpoint, torch.device("cpu"), "x")
    half = load_model(checkpoint, torch.device("cpu"), "x", torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    tokens = list(generate(half, half.config.block_size, [1, 2, 3], greedy, vocab_limit=35))
    assert len(tokens) == 5 and max(tokens) < 35
    with torch.no_grad():
        logits_full = full(torch.tensor([[1, 2, 3]]))[0][0, -1]
        logits_half = half(torch.tensor([[1, 2, 3]]))[0][0, -1].float()
    assert torch.allclose(logits_full, logits_half, atol=0.1)


def test_a_full_context_slides_with_one_notice():
    model = build()
    notices = []
    out = list(generate(model, 16, [1, 2, 3], SamplingSettings(max_new_tokens=40, temperature=0), 11,
                        on_slide=lambda: notices.append(1)))
    assert len(out) == 40 and notices == [1]


def test_filters_keep_exactly_the_expected_tokens():
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    logits = probs.log()
    kept = lambda filtered: set(torch.nonzero(torch.isfinite(filtered)).flatten().tolist())  # noqa: E731
    assert kept(keep_top_k(logits, 2)) == {0, 1}
    assert kept(keep_top_k(logits, 9)) == {0, 1, 2, 3, 4}
    assert kept(keep_top_p(logits, 0.5)) == {0}  # 0.5 alone reaches 0.5
    assert kept(keep_top_p(logits, 0.6)) == {0, 1}
    assert kept(keep_top_p(logits, 0.86)) == {0, 1, 2, 3}
    assert kept(keep_top_p(logits[[3, 0, 4, 1, 2]], 0.6)) == {1, 3}  # order of ids does not matter
    assert kept(keep_min_p(logits, 0.3)) == {0, 1, 2}  # at least 0.15 = 0.3 x 0.5
    assert kept(keep_min_p(logits, 0.0)) == {0, 1, 2, 3, 4}


def test_repetition_penalty_lowers_repeated_tokens_and_temperature_zero_is_greedy():
    logits = torch.tensor([2.0, -1.0, 0.5, 1.0])
    penalised = penalise_repetition(logits, torch.tensor([0, 1, 1]), 2.0)
    assert penalised.tolist() == [1.0, -2.0, 0.5, 1.0]  # lowered either way; others untouched
    settings = SamplingSettings(temperature=0, top_k=1, top_p=0.1, min_p=0.9)
    assert choose_token(logits, torch.tensor([], dtype=torch.long), settings, None) == 0
    settings.repetition_penalty = 3.0  # 2.0 / 3 falls below 1.0: greedy now picks id 3
    assert choose_token(logits, torch.tensor([0]), settings, None) == 3


def test_sampling_repeats_with_a_seed_and_never_picks_padding():
    model = build()
    settings = SamplingSettings(max_new_tokens=30, temperature=1.5, top_k=None)

    def sample(seed):
        generator = torch.Generator().manual_seed(seed)
        return list(generate(model, 16, [1], settings, vocab_limit=6, generator=generator))

    assert sample(7) == sample(7) != sample(8)
    assert max(sample(9)) < 6


def test_text_stream_holds_back_stop_strings_and_unfinished_characters(corpus_file):
    stream = TextStream(CharTokenizer("abcdDEN"), stops=["END"])
    # "E" and "EN" may begin "END": held back until the next character says otherwise
    assert [stream.add(i) for i in [0, 1, 5, 2, 5, 6]] == ["a", "b", "", "Ec", "", ""]
    printed = "abEc" + "".join(stream.add(i) for i in [4, 0])  # "D" completes "END": it never shows
    assert printed == "abEc" and stream.stopped and stream.result == "abEc" and stream.finish() == ""
    sentencepiece = SentencePieceTokenizer.train(iter(["plain ascii text only"] * 50), vocab_size=300)
    ids = sentencepiece.encode("añ🙂b")  # ñ and 🙂 fall back to bytes: several tokens each
    assert len(ids) > 4
    stream = TextStream(sentencepiece, stops=[])
    pieces = [stream.add(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == "añ🙂b" and not any("\ufffd" in p for p in pieces)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def type_in(monkeypatch, *lines: str) -> None:
    """Answer input() with `lines`, its prompt echoed as a terminal shows it, then Ctrl+D."""
    answers = iter(lines)

    def typed(prompt_text):
        print(prompt_text, end="")
        try:
            return next(answers)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", typed)


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    """An untrained model whose tokenizer has the ChatML tokens, saved as a checkpoint."""
    path = tmp_path_factory.mktemp("chat") / "ckpt.pt"
    tokenizer = CharTokenizer("\n !?,.abcdefghijklmnopqrstuvwxyz")
    cfg = tiny_model_config(block_size=64, vocab_size=64)
    torch.manual_seed(0)
    config = config_to_dict(Config(model=cfg))
    save_checkpoint({"model": GPT(cfg).state_dict(), "config": config, "tokenizer": tokenizer.to_dict(),
                     "step": 0}, path)
    return path


def test_chat_with_piped_stdin_answers_each_line(chat_checkpoint, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n/reset\nhow are you?\n\n/exit\nnever read\n"))
    assert run_cli(gen.main, [str(chat_checkpoint), "--chat", "--system", "be kind", "--max_new_tokens", "8",
                              "--seed", "3"]) == 0
    out = capsys.readouterr().out
    lines = out.split("\n")
    assert "(conversation forgotten)" in lines and len(lines) == 4  # reply, reset, reply, and the end
    assert IM_START not in out and IM_END not in out and "never" not in out
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n"))
    assert run_cli(gen.main, [str(chat_checkpoint), "--chat", "--system", "be kind", "--max_new_tokens", "8",
                              "--seed", "3"]) == 0
    assert capsys.readouterr().out.split("\n")[0] == lines[0]  # the same seed answers the same


@pytest.mark.parametrize("flags", [[], ["--no_stream"]])
def test_piped_chat_keeps_a_reply_with_line_breaks_on_one_line(chat_checkpoint, monkeypatch, capsys, flags):
    """A script reads one reply per line, whatever the model says (and with --no_stream too)."""
    tokenizer = CharTokenizer.from_dict(load_checkpoint(chat_checkpoint)["tokenizer"])

    def two_lines(*args, **kwargs):  # the model's reply, as generate_batch() yields it (not its <|im_end|>)
        yield from ([token] for token in tokenizer.encode("two\nlines"))

    monkeypatch.setattr(gen, "generate_batch", two_lines)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nhow are you?\n"))
    assert run_cli(gen.main, [str(chat_checkpoint), "--chat", "--device", "cpu", "--dtype", "float32",
                              *flags]) == 0
    assert capsys.readouterr().out == "two\\nlines\n" * 2


@pytest.mark.parametrize("reply, line", [
    ("plain", "plain"), ("a\nb", "a\\nb"), ("a\\nb", "a\\\\nb"), ("end\\", "end\\\\"),
    ("cr\r\nlf", "cr\\r\\nlf"), ("", "")])
def test_a_reply_line_escapes_line_breaks_and_backslashes(reply, line):
    assert escape_reply(reply) == line and "\n" not in line and "\r" not in line


@pytest.mark.parametrize("reply, line", [
    ("plain", "plain"), ("a\nb", "a\\nb"), ("a\\nb", "a\\\\nb"), ("end\\", "end\\\\"),
    ("cr\r\nlf", "cr\\r\\nlf"), ("", "")])
def test_a_piped_message_is_read_as_a_reply_line_is_written(reply, line):
    assert unescape_message(line) == reply and unescape_message(escape_reply(reply)) == reply
    assert unescape_message("C:\\temp\\x") == "C:\\temp\\x"  # other escapes stay as typed


def chat_replies(tokenizer: CharTokenizer, *replies: list[int]):
    """A generate_batch() for gen.py that answers each chat turn with the next of `replies`,
    ending where a stop id comes, as the real one does; it records each prompt it was given."""
    answers, prompts = iter(replies), []

    def generate(model, block_size, prompt, settings, vocab, generators, stop_ids=frozenset(), **kwargs):
        prompts.append(list(prompt))
        for token in next(answers):
            if token in stop_ids:
                return
            yield [token]
    return generate, prompts


def test_piped_messages_bring_their_line_breaks_and_a_reply_ends_where_another_turn_starts(
        chat_checkpoint, monkeypatch, capsys):
    tokenizer = CharTokenizer.from_dict(load_checkpoint(chat_checkpoint)["tokenizer"])
    start = tokenizer.special_ids[IM_START]
    assert reply_stop_ids(tokenizer) == frozenset(tokenizer.special_ids.values())
    # an undertrained model begins a new turn without closing its own; before, its reply's text held
    # '<|im_start|>', which the history could not encode: "the character '<' is not in this model's ..."
    generate, prompts = chat_replies(tokenizer, [*tokenizer.encode("ab"), start, *tokenizer.encode("cd")],
                                     tokenizer.encode("ok"))
    monkeypatch.setattr(gen, "generate_batch", generate)
    monkeypatch.setattr("sys.stdin", io.StringIO("a\\nb\nc\n"))
    assert run_cli(gen.main, [str(chat_checkpoint), "--chat", "--device", "cpu", "--dtype", "float32",
                              "--max_new_tokens", "4"]) == 0
    assert capsys.readouterr().out == "ab\nok\n"
    assert tokenizer.decode(prompts[0]) == "<|im_start|>user\na\nb<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(prompts[1]) == ("<|im_start|>user\na\nb<|im_end|>\n<|im_start|>assistant\nab<|im_end|>\n"
                                            "<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("flags", [[], ["--no_stream"]])
def test_a_terminal_chat_shows_every_reply_streamed_or_not(chat_checkpoint, monkeypatch, capsys, flags):
    tokenizer = CharTokenizer.from_dict(load_checkpoint(chat_checkpoint)["tokenizer"])
    generate, _ = chat_replies(tokenizer, tokenizer.encode("hi there"), tokenizer.encode("bye"))
    monkeypatch.setattr(gen, "generate_batch", generate)
    monkeypatch.setattr("sys.stdin", Terminal())
    type_in(monkeypatch, "hello", "and now?")
    assert run_cli(gen.main, [str(chat_checkpoint), "--chat", "--device", "cpu", "--dtype", "float32", *flags]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == ["you> model> hi there", "you> model> bye", "you> "]


def test_chat_refuses_a_model_without_chat_tokens(chat_checkpoint, tmp_path, capsys):
    old = load_checkpoint(chat_checkpoint)
    old["tokenizer"] = {"kind": "char", "chars": old["tokenizer"]["chars"]}  # from before special tokens
    old.pop("format"), old.pop("version")
    save_checkpoint(old, tmp_path / "old.pt")
    assert run_cli(gen.main, [str(tmp_path / "old.pt"), "--chat"]) == 2
    assert "has no ChatML tokens" in capsys.readouterr().err


def test_stop_strings_output_file_prompt_file_and_no_stream(chat_checkpoint, tmp_path, capsys):
    (tmp_path / "prompt.txt").write_text("abc")
    args = [str(chat_checkpoint), "--prompt_file", str(tmp_path / "prompt.txt"), "--max_new_tokens", "40",
            "--seed", "1", "--temperature", "2"]
    assert run_cli(gen.main, args) == 0
    full = capsys.readouterr().out
    stop = full[6:8]  # two characters that occur in the sample
    output = str(tmp_path / "out.txt")
    assert run_cli(gen.main, [*args, "--stop", stop, "--no_stream", "--output", output]) == 0
    cut = capsys.readouterr().out
    assert cut == full[: full.index(stop, 3)] + "\n" and stop not in cut[3:]
    assert (tmp_path / "out.txt").read_text() == cut


def test_benchmark_reports_prefill_and_decode_speed(chat_checkpoint, capsys):
    assert run_cli(gen.main, [str(chat_checkpoint), "--benchmark", "--max_new_tokens", "20"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["new_tokens"] == 20 and record["prompt_tokens"] == 32
    assert record["prefill_tokens_per_s"] > 0 and record["decode_tokens_per_s"] > 0
    assert 0 < record["import_torch_s"] < 60 and 0 < record["checkpoint_load_s"] < 60
    assert 0 < record["first_token_s"] < 60 and record["quantize"] == "none" and record["dtype"] == "float32"
    assert record["params"] == load_model(load_checkpoint(chat_checkpoint), torch.device("cpu"), "x").num_params()


def test_interactive_prompting_and_a_terminal_chat(chat_checkpoint, monkeypatch, capsys):
    type_in(monkeypatch, "abc", "cab")
    args = [str(chat_checkpoint), "--interactive", "--max_new_tokens", "5", "--seed", "2"]
    assert run_cli(gen.main, args) == 0
    out = capsys.readouterr().out
    assert out.count("prompt> ") == 3 and "prompt> abc" in out and "prompt> cab" in out

    type_in(monkeypatch, "hello", "/exit", "never")
    monkeypatch.setattr("sys.stdin", Terminal())
    assert run_cli(gen.main, [str(chat_checkpoint), "--chat", "--max_new_tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("chat: /reset forgets") and out.count("you> ") == 2 and "model> " in out


def test_a_full_context_is_told_after_the_text_it_would_have_cut(chat_checkpoint, monkeypatch):
    """A notice in the middle of a streamed sample cut its text in two on a terminal."""
    token = CharTokenizer.from_dict(load_checkpoint(chat_checkpoint)["tokenizer"]).encode("x")[0]

    def sliding(model, block_size, prompt, settings, vocab, generators, stop_ids=frozenset(),
                on_slide=lambda: None, steps=None):  # generate_batch, its tokens fixed: the context fills at 64
        for new in range(settings.max_new_tokens):
            if len(prompt) + new == block_size:
                on_slide()
            yield [token] * len(generators)

    monkeypatch.setattr(gen, "generate_batch", sliding)
    for flags in ([], ["--no_stream"]):
        terminal = io.StringIO()  # stdout and stderr, as one terminal shows them
        monkeypatch.setattr("sys.stdout", terminal)
        monkeypatch.setattr("sys.stderr", terminal)
        assert run_cli(gen.main, [str(chat_checkpoint), "--prompt", "abc", "--max_new_tokens", "90",
                                  "--device", "cpu", "--dtype", "float32", *flags]) == 0
        assert terminal.getvalue() == "abc" + "x" * 90 + "\n" + (
            "notice: the context of 64 tokens filled during this generation; from then on the model saw the "
            "last 48 tokens, recomputed each time it filled\n")


def test_a_prompt_longer_than_the_context_keeps_its_end(chat_checkpoint, capsys):
    assert run_cli(gen.main, [str(chat_checkpoint), "--prompt", "ab" * 40, "--max_new_tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert "the prompt has 80 tokens, more than the model's context of 64; keeping its last 64" in \
        captured.err
    assert captured.out.startswith("ab" * 40)
