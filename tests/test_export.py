"""export.py: a checkpoint that transformers loads and runs exactly as we do."""
from __future__ import annotations

import os
import shutil
import stat

import pytest
import torch

import export
import train
from checkpoint import load_checkpoint, load_model, save_checkpoint
from cli import run_cli
from config import Config, ModelConfig, config_to_dict, padded_vocab_size
from errors import UserError
from huggingface import checkpoint_from_hf
from model import GPT
from model_card import CARD_SECTIONS
from tokenizer import IM_END, IM_START, CharTokenizer, SentencePieceTokenizer, TiktokenTokenizer

transformers = pytest.importorskip("transformers")

TEXT = "ROMEO: What light through yonder window breaks? — Ça, c'est l'été. ✓\n"
UNICODE_LINE = "ROMEO: l'été — ✓ breaks? Ça"  # characters of TEXT only: ours refuses others


def save_model(path, **options) -> tuple[GPT, CharTokenizer]:
    """Save a random tiny model (options: ModelConfig fields) over TEXT's characters."""
    tokenizer = CharTokenizer.train([TEXT])
    settings = dict(n_layer=2, n_head=2, n_embd=32, block_size=64,
                    vocab_size=padded_vocab_size(tokenizer.vocab_size, 64))
    model_cfg = ModelConfig(**{**settings, **options})
    torch.manual_seed(0)
    model = GPT(model_cfg).eval()
    with torch.no_grad():  # biases and gains away from their 0 and 1, so a mix-up shows
        for name, param in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                param.add_(0.1 * torch.randn_like(param))
    save_checkpoint({"model": model.state_dict(), "config": config_to_dict(Config(model=model_cfg)),
                     "step": 7, "tokenizer": tokenizer.to_dict(), "losses": {}}, path)
    return model, tokenizer


@pytest.mark.parametrize("options", [{}, {"bias": True, "tie_embeddings": False}])
def test_transformers_loads_the_export_and_computes_the_same_logits(workdir, options):
    model, tokenizer = save_model(workdir / "model.pt", **options)
    export.export(workdir / "model.pt", workdir / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(workdir / "hf").eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    ids = torch.tensor([tokenizer.encode(TEXT[:20])])
    with torch.no_grad():
        ours, _ = model(ids)
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)

    assert_same_greedy_tokens(model, hf, ids)


def assert_same_greedy_tokens(model: GPT, hf, ids: torch.Tensor, count: int = 20) -> None:
    """transformers' greedy generate and ours (recomputed each time, argmax over every row of
    the head) pick the same `count` tokens."""
    greedy = ids
    for _ in range(count):
        with torch.no_grad():
            next_id = model(greedy)[0][:, -1].argmax(-1, keepdim=True)
        greedy = torch.cat([greedy, next_id], dim=1)
    generated = hf.generate(ids, max_new_tokens=count, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert generated.tolist() == greedy.tolist()


def test_the_exported_tokenizer_encodes_and_decodes_as_ours(workdir):
    _, tokenizer = save_model(workdir / "model.pt")
    export.export(workdir / "model.pt", workdir / "hf")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(workdir / "hf")
    ids = hf_tokenizer(UNICODE_LINE).input_ids
    assert ids == tokenizer.encode(UNICODE_LINE)
    assert hf_tokenizer.decode(ids) == UNICODE_LINE
    assert hf_tokenizer.eos_token == "<|endoftext|>"
    assert hf_tokenizer.convert_tokens_to_ids(IM_START) == tokenizer.special_ids[IM_START]
    chat = hf_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                            add_generation_prompt=True)
    assert chat == f"{IM_START}user\nhi{IM_END}\n{IM_START}assistant\n"


def test_the_model_card_has_every_section(workdir, capsys):
    save_model(workdir / "model.pt")
    trained = load_checkpoint(workdir / "model.pt")
    save_checkpoint({**trained, "dtype": "bfloat16"}, workdir / "model.pt")  # what dtype auto chose
    assert run_cli(export.main, ["model.pt", "--out", "hf"]) == 0
    card = (workdir / "hf" / "README.md").read_text()
    for section in CARD_SECTIONS:
        assert f"\n## {section}\n" in card
    assert 'AutoModelForCausalLM.from_pretrained("./hf")' in card and "step 7" in card  # "hf": a Hub id
    assert "`<\\|endoftext\\|>`" in card  # escaped inside the table
    assert "| hardware | unknown (unknown CPU), bfloat16 |" in card  # the dtype trained in, not "auto"
    assert "model.safetensors" in capsys.readouterr().out


LLAMA = {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu"}


@pytest.mark.parametrize("options", [{}, {"n_kv_head": 1, "tie_embeddings": False}])
def test_a_llama_shaped_model_exports_as_llama_with_the_same_logits(workdir, options):
    model, tokenizer = save_model(workdir / "model.pt", **LLAMA, **options)
    export.export(workdir / "model.pt", workdir / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(workdir / "hf").eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids = torch.tensor([tokenizer.encode(TEXT[:40])])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids)[0], rtol=1e-5, atol=1e-5)
    assert_same_greedy_tokens(model, hf, ids[:, :20])
    assert "LlamaForCausalLM" in (workdir / "hf" / "README.md").read_text()


@pytest.mark.parametrize("options, named", [
    ({"norm": "rmsnorm"}, "model.norm"), ({"mlp": "swiglu"}, "model.mlp"),
    ({"qk_norm": True}, "model.qk_norm"), ({"n_kv_head": 1}, "model.n_kv_head"),
    ({**LLAMA, "mlp": "relu2"}, "model.mlp"),
    ({**LLAMA, "bias": True}, "model.bias"), ({**LLAMA, "qk_norm": True}, "model.qk_norm")])
def test_an_option_transformers_cannot_represent_is_refused_by_name(workdir, options, named):
    save_model(workdir / "model.pt", **options)
    with pytest.raises(UserError, match=named):
        export.export(workdir / "model.pt", workdir / "hf")
    assert not (workdir / "hf").exists()  # nothing half-written


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_every_exported_file_gets_the_mode_a_plain_open_gives(workdir, umask):
    """Shared folders and uploads need the weights readable like the rest (not 0600)."""
    save_model(workdir / "model.pt")
    (workdir / "loss.png").write_bytes(b"png")  # so the plot is copied too
    old = os.umask(umask)
    try:
        written = export.export(workdir / "model.pt", workdir / "hf")
    finally:
        os.umask(old)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in written}
    assert "model.safetensors" in modes and "loss.png" in modes
    assert modes == {name: 0o666 & ~umask for name in modes}


def test_a_folder_with_files_is_not_written_over(workdir):
    save_model(workdir / "model.pt")
    (workdir / "hf").mkdir()
    (workdir / "hf" / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="not empty"):
        export.export(workdir / "model.pt", workdir / "hf")
    assert (workdir / "hf" / "mine.txt").read_text() == "keep"


# ---------------------------------------------------------------- importing folders back


def test_export_then_import_gives_back_the_same_model(workdir):
    model, _ = save_model(workdir / "model.pt")
    export.export(workdir / "model.pt", workdir / "hf")
    imported = checkpoint_from_hf(workdir / "hf")
    again = load_model(imported, torch.device("cpu"), "hf")
    assert again.config == model.config  # the same shape, biases off again
    ids = torch.tensor([list(range(10))])
    with torch.no_grad():
        torch.testing.assert_close(again(ids)[0], model(ids)[0], rtol=0, atol=0)


def test_a_gpt2_made_by_transformers_imports_with_the_same_logits(workdir):
    """OpenAI's GPT-2 shape: tanh GELU, biases, its own config; our tokenizer file beside it."""
    _, tokenizer = save_model(workdir / "model.pt")
    export.export(workdir / "model.pt", workdir / "ours")
    config = transformers.GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     activation_function="gelu_new", tie_word_embeddings=False)
    torch.manual_seed(1)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # transformers starts biases at zero; real GPT-2's are not
        for name, param in hf.named_parameters():
            if name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    hf.save_pretrained(workdir / "gpt2", safe_serialization=True)
    shutil.copyfile(workdir / "ours" / "tokenizer.json", workdir / "gpt2" / "tokenizer.json")
    imported = checkpoint_from_hf(workdir / "gpt2")
    assert imported["config"]["model"]["mlp"] == "gelu_tanh" and imported["config"]["model"]["bias"]
    ours = load_model(imported, torch.device("cpu"), "gpt2")
    ids = torch.tensor([tokenizer.encode(TEXT[:30])])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_train_starts_from_a_hugging_face_folder(workdir, tiny_config_file, capsys):
    save_model(workdir / "model.pt")
    export.export(workdir / "model.pt", workdir / "hf")
    text = workdir / "play.txt"
    text.write_text(TEXT * 200)
    assert run_cli(train.main, ["--config", str(tiny_config_file), "--load_model_only", "hf", "--dataset",
                                str(text), "--max_steps", "2", "--out_dir", "tuned"]) == 0
    assert "starting from the weights of Hugging Face folder hf" in capsys.readouterr().out
    tuned = load_checkpoint(workdir / "tuned" / "ckpt.pt")
    assert tuned["config"]["model"]["block_size"] == 64 and tuned["step"] == 2  # the folder's shape


def test_a_folder_of_another_architecture_is_refused(workdir):
    (workdir / "llama").mkdir()
    (workdir / "llama" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(UserError, match="only GPT-2 folders import"):
        checkpoint_from_hf(workdir / "llama")


# ---------------------------------------------------------------- uploading


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_a_dry_run_lists_the_upload_and_touches_no_network(workdir, no_network, capsys):
    save_model(workdir / "model.pt")
    assert run_cli(export.main, ["model.pt", "--out", "hf", "--push_to_hub", "me/tiny", "--private",
                                 "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "would upload 6 files" in out and "https://huggingface.co/me/tiny (private)" in out
    assert "model.safetensors" in out and "README.md" in out
    card = (workdir / "hf" / "README.md").read_text()  # loads by the name it gets there, not "hf"
    assert "# me/tiny\n" in card and 'AutoModelForCausalLM.from_pretrained("me/tiny")' in card


def test_an_upload_without_a_token_or_network_is_one_line(workdir, no_network, monkeypatch, capsys):
    save_model(workdir / "model.pt")
    monkeypatch.setenv("HF_HOME", str(workdir / "hf-home"))  # no stored token there
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert run_cli(export.main, ["model.pt", "--out", "hf", "--push_to_hub", "me/tiny"]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err
    assert (workdir / "hf" / "model.safetensors").is_file()  # the export itself stands


def test_an_upload_with_a_token_and_no_network_is_one_line(workdir, monkeypatch, capsys):
    """The real huggingface_hub call fails as it does offline: its HTTP client's own error."""
    import socket

    def unknown_host(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    for owner, name in ((socket, "getaddrinfo"), (socket, "create_connection"), (socket.socket, "connect")):
        monkeypatch.setattr(owner, name, unknown_host)
    monkeypatch.setenv("HF_HOME", str(workdir / "hf-home"))
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    save_model(workdir / "model.pt")
    assert run_cli(export.main, ["model.pt", "--out", "hf", "--push_to_hub", "me/tiny", "--private"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "upload to me/tiny failed" in err and "Traceback" not in err
    assert (workdir / "hf" / "model.safetensors").is_file()  # the export itself stands


@pytest.mark.parametrize("repo", ["me/", "a b", "me/tiny/extra", ".bad"])
def test_a_bad_repository_id_is_refused_before_anything_is_written(workdir, repo, capsys):
    save_model(workdir / "model.pt")
    assert run_cli(export.main, ["model.pt", "--out", "hf", "--push_to_hub", repo]) == 2
    assert "is not a repository id" in capsys.readouterr().err and not (workdir / "hf").exists()


# ---------------------------------------------------------------- SentencePiece tokenizers


def export_with_tokenizer(workdir, tokenizer, **data_settings):
    """Export a random one-layer model with `tokenizer`; return transformers' tokenizer for it."""
    model_cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=320)
    cfg = Config(model=model_cfg)
    for name, value in data_settings.items():
        setattr(cfg.data, name, value)
    save_checkpoint({"model": GPT(model_cfg).state_dict(), "config": config_to_dict(cfg), "step": 1,
                     "tokenizer": tokenizer.to_dict(), "losses": {}}, workdir / "model.pt")
    export.export(workdir / "model.pt", workdir / "hf")
    return transformers.AutoTokenizer.from_pretrained(workdir / "hf")


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_a_sentencepiece_tokenizer_exports_and_imports_exactly(workdir, small_corpus_file, model_type):
    text = small_corpus_file.read_text()
    sp = SentencePieceTokenizer.train(iter(text.splitlines(keepends=True)), 300, model_type)
    hf_tokenizer = export_with_tokenizer(workdir, sp, sentencepiece_model=model_type)
    # spaces, line breaks of every kind str.splitlines knows, and characters only bytes can spell
    probe = text[:3000] + "  double  spaces,\r\nCRLF \u2028 é — ✓ 🎉\n\nend"
    ids = hf_tokenizer(probe).input_ids
    assert ids == sp.encode(probe)
    assert hf_tokenizer.decode(ids) == probe
    assert hf_tokenizer.convert_tokens_to_ids(IM_END) == sp.special_ids[IM_END]
    assert checkpoint_from_hf(workdir / "hf")["tokenizer"] == sp.to_dict()  # tokenizer.model comes back


def test_a_tiktoken_tokenizer_exports_as_byte_level_bpe(workdir, monkeypatch):
    """tiktoken's files are downloads, so a small BPE trained here stands in for 'gpt2'."""
    import tiktoken
    from tiktoken._educational import bpe_train

    text = "ROMEO: What light through yonder window breaks? It is the east, and Juliet is the sun. " * 20
    pattern = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""  # GPT-2's
    ranks = bpe_train(text, 300, pattern, visualise=None)
    small = tiktoken.Encoding("gpt2", pat_str=pattern, mergeable_ranks=ranks,
                              special_tokens={"<|endoftext|>": 300})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: small)
    ours = TiktokenTokenizer("gpt2")
    hf_tokenizer = export_with_tokenizer(workdir, ours)
    probe = text[:400] + " they'll  go — é ✓ 🎉\n\n  12345 end"
    ids = hf_tokenizer(probe).input_ids
    assert ids == ours.encode(probe)
    assert hf_tokenizer.decode(ids) == probe
    specials = ("<|endoftext|>", IM_START, IM_END)
    assert [hf_tokenizer.convert_tokens_to_ids(t) for t in specials] == [300, 301, 302]


def test_no_module_of_ours_takes_the_name_of_an_installed_one():
    """Run from the repository root, a top-level module of ours hides any package of that name.

    transformers 5.25 installs and imports Hugging Face's `kernels` package; our old kernels.py
    was imported in its place, and `from transformers import pipeline` failed in CI.
    """
    import importlib.machinery
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    others = [entry for entry in os.sys.path if entry and Path(entry).resolve() != root]
    ours = sorted(path.stem for path in root.glob("*.py"))
    taken = [name for name in ours if importlib.machinery.PathFinder.find_spec(name, others)]
    assert ours and taken == [], f"modules of ours named like installed ones: {taken}"
