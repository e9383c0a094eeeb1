"""Reading rows of parquet and JSONL files as a stream, `CHUNK_ROWS` at a time, and their fields.

Bad input (a missing file or column, a line that is not a JSON object, a field of the wrong type)
stops with a one-line `DataError` naming the file, the row and the column.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq


class DataError(ValueError):
    """Bad input data. The message names the file, the row and the column."""


# ----------------------------------------------------------------------------- reading
def as_file_list(files: Any, key: str) -> list[str]:
    if files is None:
        return []
    if isinstance(files, (str, Path)):
        return [str(Path(files).expanduser())]
    if isinstance(files, Iterable):
        return [str(Path(f).expanduser()) for f in files]
    raise DataError(f"{key}: expected a file path or a list of paths, got {type(files).__name__}")


@dataclass
class Row:
    file: str
    index: int  # 0-based row number within the file
    values: dict
    locator: int = -1  # where to read the row again: its byte offset (JSONL) or its index (parquet)


CHUNK_ROWS = 1024  # rows read and tokenized at a time: memory stays bounded, a bad row stops the run early


def read_rows(path: str, columns: Sequence[str], key: str, optional: Sequence[str] = ()) -> list[Row]:
    """Rows of one parquet or JSONL file, keeping only `columns` (which must all exist) and the
    `optional` columns the file has."""
    return [row for chunk in iter_row_chunks(path, columns, key, optional) for row in chunk]


def iter_row_chunks(
    path: str, columns: Sequence[str], key: str, optional: Sequence[str] = (), chunk_rows: int = CHUNK_ROWS
) -> Iterator[list[Row]]:
    """The rows of one parquet or JSONL file, `chunk_rows` at a time, read as a stream."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{key}: file not found: {path}")
    suffix = file.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_chunks(file, path, columns, optional, chunk_rows)
    elif suffix in (".jsonl", ".json"):
        yield from _jsonl_chunks(file, path, columns, optional, chunk_rows)
    else:
        raise DataError(f"{key}: unsupported file type {suffix!r} for {path} (use .parquet or .jsonl)")


def file_columns(path: str, key: str) -> list[str]:
    """The column names of a parquet file (its schema) or a JSONL file (its first row's keys):
    what a reader checks to tell the file's layout before reading it."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{key}: file not found: {path}")
    if file.suffix.lower() == ".parquet":
        try:
            return list(pq.ParquetFile(file).schema_arrow.names)
        except (pa.ArrowException, OSError) as err:
            raise _parquet_error(path, err) from None
    for chunk in _jsonl_chunks(file, path, (), (), 1):
        return list(chunk[0].values)
    return []


def _parquet_error(path: str, err: Exception) -> DataError:  # not parquet, truncated, a corrupt page
    return DataError(f"{path}: not a readable parquet file ({str(err).splitlines()[0] if str(err) else type(err).__name__})")


def _parquet_chunks(file: Path, path: str, columns: Sequence[str], optional: Sequence[str], chunk_rows: int) -> Iterator[list[Row]]:
    try:
        parquet = pq.ParquetFile(file)
        schema_names = parquet.schema_arrow.names
    except (pa.ArrowException, OSError) as err:
        raise _parquet_error(path, err) from None
    missing = [c for c in columns if c not in schema_names]
    if missing:
        raise DataError(f"{path}: column {missing[0]!r} not found (columns: {', '.join(schema_names)})")
    wanted = list(columns) + [c for c in optional if c in schema_names and c not in columns]
    batches = parquet.iter_batches(batch_size=chunk_rows, columns=wanted)
    start = 0
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as err:
            raise _parquet_error(path, err) from None
        if batch is None:
            return
        values = batch.to_pylist()
        yield [Row(path, start + i, v, start + i) for i, v in enumerate(values)]
        start += len(values)


def _jsonl_chunks(file: Path, path: str, columns: Sequence[str], optional: Sequence[str], chunk_rows: int) -> Iterator[list[Row]]:
    """Rows of a JSONL file (one JSON object per line); the error names the file and row."""
    rows: list[Row] = []
    offset = 0
    with open(file, "rb") as handle:
        for line_no, raw in enumerate(handle):
            row = _jsonl_row(raw, path, line_no, offset, columns, optional)
            offset += len(raw)
            if row is None:
                continue
            rows.append(row)
            if len(rows) == chunk_rows:
                yield rows
                rows = []
    if rows:
        yield rows


def _jsonl_row(raw: bytes, path: str, line_no: int, offset: int, columns: Sequence[str], optional: Sequence[str]) -> Optional[Row]:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: row {line_no}: not UTF-8 text (a JSONL file is one JSON object per line)") from None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: row {line_no}: not valid JSON ({err.msg})") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}: row {line_no}: expected a JSON object, got {type(record).__name__}")
    for c in columns:
        if c not in record:
            raise DataError(f"{path}: row {line_no}: column {c!r} not found")
    if not columns and not optional:  # file_columns: every key of the row
        return Row(path, line_no, record, offset)
    return Row(path, line_no, {c: record[c] for c in [*columns, *optional] if c in record}, offset)


def dig(row: Row, column: str, dict_keys: Optional[Sequence[str]]) -> Any:
    value = row.values[column]
    path = column
    for k in dict_keys or ():
        if not isinstance(value, dict):
            raise DataError(f"{row.file}: row {row.index}: column {path!r} is {type(value).__name__}, not a dict with key {k!r}")
        if k not in value:
            raise DataError(f"{row.file}: row {row.index}: column {path!r} has no key {k!r}")
        value = value[k]
        path = f"{path}.{k}"
    return value


def text_field(row: Row, column: str, dict_keys: Optional[Sequence[str]]) -> str:
    value = dig(row, column, dict_keys)
    shown = ".".join([column, *(dict_keys or [])])
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataError(f"{row.file}: row {row.index}: column {shown!r} is {type(value).__name__}, expected text")
    return value
