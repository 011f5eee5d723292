"""Parquet sources: single files or folders of shards (FineWeb-Edu, SmolTalk are shipped so).

A file is read a row group at a time, only the one column it is trained on, so memory holds
about one row group however large the file: a `text` column of strings for base text,
or a `messages` column (a list of {role, content} structs) for chats; data.text_column and
data.messages_column rename them. A file with the chat column is read as chats, else as text.
Each row is one document, built exactly as the same JSONL record would be. Rows with a null or
blank value are left out, as blank lines of a JSONL file are: published shards hold a few.

corpus.py imports this module only when a parquet file comes, so pyarrow is needed only then.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from corpus import Piece, chat_document, text_document
from errors import UserError

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ModuleNotFoundError:
    raise UserError("reading .parquet files needs pyarrow: pip install pyarrow") from None

ROWS_PER_BATCH = 1024  # rows of a row group converted to Python strings at a time
COLUMNS_SHOWN = 10  # of a file without the configured columns, this many are named in the error


def _reason(error: Exception) -> str:
    """The first line of pyarrow's message (some run on over several)."""
    return (str(error).splitlines() or [type(error).__name__])[0]


def _open(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"{path} is not a readable parquet file ({_reason(error)}); "
                        "write it again or leave it out") from None


def parquet_bytes(path: Path) -> int:
    """Return the file's data size uncompressed (from its footer): about its text, for the
    progress bar and the SentencePiece sample, where the size on disk is compressed."""
    metadata = _open(path).metadata
    return sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))


def _is_string(tp: pa.DataType) -> bool:
    return pa.types.is_string(tp) or pa.types.is_large_string(tp)


def _is_chat(tp: pa.DataType) -> bool:
    """Whether a column type is a list of structs with string `role` and `content` fields."""
    if not (pa.types.is_list(tp) or pa.types.is_large_list(tp)) or not pa.types.is_struct(tp.value_type):
        return False
    turn = tp.value_type
    return all(turn.get_field_index(name) >= 0 and _is_string(turn.field(name).type)
               for name in ("role", "content"))


def _column(path: Path, schema: pa.Schema, text_column: str, messages_column: str) -> tuple[str, bool]:
    """Return the column a file is read by and whether it holds chats, or raise the one line
    that names the file, its columns and the field to set."""
    names = schema.names
    if messages_column in names:
        tp = schema.field(messages_column).type
        if not _is_chat(tp):
            raise UserError(f"{path}: column '{messages_column}' holds {tp}, not a list of "
                            "{role, content} strings; name the chat column with --data.messages_column NAME")
        return messages_column, True
    if text_column in names:
        tp = schema.field(text_column).type
        if not _is_string(tp):
            raise UserError(f"{path}: column '{text_column}' holds {tp}, not strings; "
                            "name the text column with --data.text_column NAME")
        return text_column, False
    shown = ", ".join(names[:COLUMNS_SHOWN]) + (f" and {len(names) - COLUMNS_SHOWN} more"
                                                if len(names) > COLUMNS_SHOWN else "")
    raise UserError(f"{path} has no column '{text_column}' or '{messages_column}' (it has "
                    f"{shown or 'none'}); name yours with --data.text_column NAME or "
                    "--data.messages_column NAME")


def _values(file: pq.ParquetFile, column: str, path: Path) -> Iterator[list]:
    """Yield one column's values a row group at a time, converted ROWS_PER_BATCH rows at a
    time; a damaged file is one line. (iter_batches held several times more: it reads ahead.)"""
    try:
        for group in range(file.num_row_groups):
            values = file.read_row_group(group, columns=[column]).column(0)
            for start in range(0, len(values), ROWS_PER_BATCH):
                yield values.slice(start, ROWS_PER_BATCH).to_pylist()
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"{path} is damaged: reading column '{column}' failed "
                        f"({_reason(error)}); write it again or leave it out") from None


def parquet_documents(path: Path, text_column: str, messages_column: str) -> Iterator[Piece]:
    """Yield a parquet file's rows as documents, in order; `path row N` counts rows from 0."""
    file = _open(path)
    column, chats = _column(path, file.schema_arrow, text_column, messages_column)
    row, count = 0, 0
    for values in _values(file, column, path):
        for value in values:
            if chats and value:
                count += 1
                yield chat_document(value, f"{path} row {row}")
            elif not chats and value and not value.isspace():
                count += 1
                yield text_document(value)
            row += 1
    if not count:
        raise UserError(f"{path} holds no rows with a value in column '{column}'; "
                        "fill it or leave the file out")
