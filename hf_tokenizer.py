"""Our tokenizers as Hugging Face tokenizer files: tokenizer.json (the `tokenizers` library's
format) that encodes exactly as ours, and tokenizer_config.json for AutoTokenizer. Character
tokenizers become a WordLevel vocabulary, SentencePiece models a BPE or unigram model with byte
fallback, tiktoken encodings a byte-level BPE like GPT-2's own.
"""
from __future__ import annotations

import json

from errors import UserError
from tokenizer import (
    END_OF_TEXT,
    IM_END,
    IM_START,
    CharTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    Tokenizer,
)

# ChatML, as chat.py writes it, in the Jinja that transformers' apply_chat_template runs.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '" + IM_START + "' + message['role'] + '\\n' + message['content'] + '"
    + IM_END + "\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '" + IM_START + "assistant\\n' }}"
    "{% endif %}"
)


def char_tokenizer_json(tokenizer: CharTokenizer) -> str:
    """Return tokenizer.json (the `tokenizers` library's format) that encodes as our character
    tokenizer does: every character alone looked up in the vocabulary, the special tokens after."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab = {ch: i for i, ch in enumerate(tokenizer.chars)}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token=None))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    hf.decoder = decoders.Fuse()
    return _with_specials(hf, tokenizer)


def bpe_merges(pieces: list[tuple[str, float, bool]]) -> list[tuple[str, str]]:
    """Return the merges that rebuild SentencePiece's BPE pieces, in the order of its pieces
    (their scores): every split of a piece into two pieces of the vocabulary."""
    vocab = {text: i for i, (text, _, _) in enumerate(pieces)}
    merges = []
    for text, _, ordinary in pieces:
        splits = [(text[:k], text[k:]) for k in range(1, len(text)) if ordinary
                  and text[:k] in vocab and text[k:] in vocab]
        merges += sorted(splits, key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
    return merges


def sentencepiece_tokenizer_json(tokenizer: SentencePieceTokenizer, model_type: str) -> str:
    """Return tokenizer.json that encodes as our SentencePiece model does: spaces as '▁', byte
    fallback, BPE merges in score order (or the unigram scores), never across a line break
    (we encode line by line, at str.splitlines' boundaries)."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    pieces = tokenizer.pieces()
    if model_type == "bpe":
        vocab = {text: i for i, (text, _, _) in enumerate(pieces)}
        model = models.BPE(vocab, bpe_merges(pieces), unk_token=pieces[0][0], byte_fallback=True,
                           fuse_unk=True)
    else:
        model = models.Unigram([(text, score) for text, score, _ in pieces], unk_id=0, byte_fallback=True)
    hf = HFTokenizer(model)
    hf.normalizer = normalizers.Replace(" ", "\u2581")
    line_breaks = Regex("\r\n|[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
    hf.pre_tokenizer = pre_tokenizers.Split(line_breaks, behavior="merged_with_previous")
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                    decoders.Fuse()])
    return _with_specials(hf, tokenizer)


def byte_symbols() -> dict[int, str]:
    """Return GPT-2's printable stand-in for each byte, as byte-level BPE files spell tokens:
    printable Latin-1 bytes stand for themselves, the others for code points from 256 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    stand_ins = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(stand_ins)) for b in range(256)}


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Return the merges of a tiktoken BPE in rank order: each token is the merge of the two
    parts that BPE with only the lower ranks leaves of its bytes."""
    def parts_below(token: bytes, rank: int) -> list[bytes]:
        parts = [bytes([b]) for b in token]
        while True:
            pairs = [(ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)]
            best, i = min(pairs, default=(rank, 0))
            if best >= rank:
                return parts
            parts[i:i + 2] = [parts[i] + parts[i + 1]]

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            first, second = parts_below(token, rank)
            merges.append((first, second))
    return merges


def tiktoken_tokenizer_json(tokenizer: TiktokenTokenizer) -> str:
    """Return tokenizer.json (byte-level BPE, as GPT-2's own) that encodes as the tiktoken
    encoding does: its regex splits the text, each piece's bytes are merged by rank."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    symbols = byte_symbols()

    def spell(token: bytes) -> str:
        return "".join(symbols[b] for b in token)

    vocab = {spell(token): rank for token, rank in tokenizer.ranks.items()}
    vocab.update(tokenizer.all_special_ids)  # at their own ids, gaps and all
    merges = [(spell(a), spell(b)) for a, b in merges_from_ranks(tokenizer.ranks)]
    hf = HFTokenizer(models.BPE(vocab, merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    return _with_specials(hf, tokenizer)


def _with_specials(hf, tokenizer: Tokenizer) -> str:
    """Add our special tokens at our ids and return the tokenizer.json text."""
    hf.add_special_tokens(list(tokenizer.special_ids))
    for name, index in tokenizer.special_ids.items():
        if hf.token_to_id(name) != index:
            raise UserError(f"the exported tokenizer numbers {name} {hf.token_to_id(name)}, not {index}")
    return hf.to_str()


def tokenizer_files(tokenizer: Tokenizer, block_size: int, sentencepiece_model: str = "bpe") -> dict:
    """Return the tokenizer's files for AutoTokenizer, by name (text, or bytes for
    SentencePiece's own tokenizer.model, which importing reads back)."""
    if isinstance(tokenizer, CharTokenizer):
        files: dict = {"tokenizer.json": char_tokenizer_json(tokenizer)}
    elif isinstance(tokenizer, SentencePieceTokenizer):
        files = {"tokenizer.json": sentencepiece_tokenizer_json(tokenizer, sentencepiece_model),
                 "tokenizer.model": tokenizer.model}
    else:
        files = {"tokenizer.json": tiktoken_tokenizer_json(tokenizer)}
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
                "clean_up_tokenization_spaces": False}
    if END_OF_TEXT in tokenizer.special_ids:
        settings.update(bos_token=END_OF_TEXT, eos_token=END_OF_TEXT)
    if IM_START in tokenizer.special_ids:
        settings["chat_template"] = CHATML_TEMPLATE
    files["tokenizer_config.json"] = json.dumps(settings, indent=2)
    return files
