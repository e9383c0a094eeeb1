"""SFT data given the way TRL users give it: a `datasets.Dataset` (or `DatasetDict`), a
`save_to_disk` folder, a hub id, or files; and TRL's column formats recognised.

Everything ends as parquet or JSONL files, so the token cache (trainer/token_cache.py) tokenizes
each data set once and every rank memory-maps the result. A `Dataset` is written once to
`<cache_dir>/datasets/<fingerprint>.parquet`: `datasets` derives the fingerprint from the rows of
an in-memory table and from the transforms of a loaded one, and the token cache's own key is the
parquet file's bytes, so a changed data set is never served stale tokens.

`datasets` is an optional extra (`pip install 'sample-aware-trainer[datasets]'`), imported only
for a folder written by `save_to_disk` or a hub id; a `Dataset` object brings its own.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from trainer.data.rows import DataError, iter_row_chunks

EXTRA = "pip install 'sample-aware-trainer[datasets]'"
_FILE_SUFFIXES = (".parquet", ".jsonl", ".json")
_VAL_TAGS = ("val", "test", "valid")
TRAIN_SPLIT = "train"
EVAL_SPLITS = ("validation", "valid", "val", "test")


# ----------------------------------------------------------------------------- TRL's formats
@dataclass(frozen=True)
class Format:
    """One of TRL's SFT data formats: what it is called, how it is recognised from a row's
    columns and values, and the data keys that read it here (relative to `data.`)."""

    name: str
    matches: Callable[[dict], bool]
    keys: dict


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


# Tried in order; the first that matches decides.
FORMATS = (
    Format("conversational (messages)", lambda r: _is_messages(r.get("messages")),
           {"multiturn.enable": True, "multiturn.messages_key": "messages", "multiturn.completion_key": None}),
    Format("conversational prompt-completion", lambda r: _is_messages(r.get("prompt")) and _is_messages(r.get("completion")),
           {"multiturn.enable": True, "multiturn.messages_key": "prompt", "multiturn.completion_key": "completion"}),
    Format("prompt-completion", lambda r: isinstance(r.get("prompt"), str) and "completion" in r,
           {"multiturn.enable": False, "prompt_key": "prompt", "response_key": "completion"}),
    Format("prompt-response", lambda r: isinstance(r.get("prompt"), str) and "response" in r,
           {"multiturn.enable": False, "prompt_key": "prompt", "response_key": "response"}),
)
# TRL formats SFT here does not train on, each with what to do instead.
_REFUSED = {
    "text": "TRL's language-modeling format (a `text` column) is not supported: SFT here trains on responses; "
            "give `prompt`/`completion` or `messages` columns",
    "chosen": "preference data (`chosen`/`rejected`) is for DPO, which this project does not have",
}
_CANDIDATE_COLUMNS = ("messages", "prompt", "completion", "response", *_REFUSED)


def detect_format(row: dict, where: str) -> Format:
    """The TRL format of a row (its first), or a one-line DataError naming `where`."""
    for fmt in FORMATS:
        if fmt.matches(row):
            return fmt
    for column, why in _REFUSED.items():
        if column in row:
            raise DataError(f"{where}: {why}")
    known = "; ".join(f.name for f in FORMATS)
    raise DataError(f"{where}: columns {sorted(row)} match none of the formats read here ({known}); "
                    "or set data.prompt_key/data.response_key or data.multiturn.* yourself")


def first_row(path: str, key: str) -> dict:
    """The first row of a parquet or JSONL file (every column, so an error can list them)."""
    columns = _CANDIDATE_COLUMNS
    if path.lower().endswith(".parquet"):
        try:
            columns = tuple(pq.ParquetFile(path).schema_arrow.names)
        except (pa.ArrowException, OSError):
            pass  # iter_row_chunks says what is wrong with the file, naming it
    elif path.lower().endswith((".jsonl", ".json")):
        columns = _jsonl_columns(path)
    for chunk in iter_row_chunks(path, [], key, columns, chunk_rows=1):
        if chunk:
            return chunk[0].values
    raise DataError(f"{path}: no rows ({key})")


def _jsonl_columns(path: str) -> tuple[str, ...]:
    try:
        with open(path, "rb") as handle:
            for raw in handle:
                if raw.strip():
                    record = json.loads(raw)
                    return tuple(record) if isinstance(record, dict) else _CANDIDATE_COLUMNS
    except (OSError, ValueError):
        pass  # iter_row_chunks names the file and row
    return _CANDIDATE_COLUMNS


# ----------------------------------------------------------------------------- sources to files
def is_dataset(obj: Any) -> bool:
    """A `datasets.Dataset` (duck-typed: `datasets` need not be importable to ask)."""
    return hasattr(obj, "to_parquet") and hasattr(obj, "_fingerprint") and hasattr(obj, "column_names")


def is_dataset_dict(obj: Any) -> bool:
    return type(obj).__name__ in ("DatasetDict", "IterableDatasetDict") or (
        isinstance(obj, dict) and bool(obj) and all(is_dataset(v) for v in obj.values()))


def _datasets(argument: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{argument}: reading it needs the `datasets` package: {EXTRA}") from None
    return datasets


def _dataset_folder(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _folder_files(folder: Path, want_val: bool) -> list[str]:
    """Parquet/JSONL files of a folder: the training files, or those whose name says val/test.
    Files named `rl_*` (RL prompts beside SFT data, as in the demo) are left out."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in _FILE_SUFFIXES and not p.name.startswith("rl"))
    return [str(p) for p in files if any(tag in p.name for tag in _VAL_TAGS) == want_val]


def open_source(source: Any, argument: str) -> Any:
    """What a TRL-style data argument names: a list of files, a folder of files (a Path), a
    `Dataset` or a `DatasetDict`. `argument` names it in errors (`train_dataset=...`)."""
    if type(source).__name__.startswith("Iterable"):  # IterableDataset, IterableDatasetDict
        raise DataError(f"{argument}: a streaming (Iterable) dataset cannot be tokenized once into the token cache; "
                        "load it with streaming=False")
    if is_dataset(source) or is_dataset_dict(source):
        return source
    if isinstance(source, (list, tuple)) and source and all(isinstance(s, (str, Path)) for s in source):
        return [str(Path(s).expanduser()) for s in source]
    if not isinstance(source, (str, Path)):
        raise DataError(f"{argument}: expected a datasets.Dataset, a file or folder path, or a hub id; got {type(source).__name__}")
    path = Path(source).expanduser()
    if path.is_file():
        return [str(path)]
    if path.is_dir() and _dataset_folder(path):
        return _datasets(argument).load_from_disk(str(path))
    if path.is_dir() and _folder_files(path, want_val=False):
        return path
    if path.suffix.lower() in _FILE_SUFFIXES and not path.exists():  # a data file's name, not a hub id
        raise DataError(f"{argument}: file not found: {path}")
    # Not a local file or folder of ours: the hub (or a folder `load_dataset` reads, e.g. CSV).
    datasets = _datasets(argument)
    try:
        return datasets.load_dataset(str(source))
    except Exception as err:  # noqa: BLE001 - one line naming the culprit
        first = str(err).splitlines()[0] if str(err) else ""
        raise DataError(f"{argument}: {str(source)!r} is neither a local file or folder nor a dataset "
                        f"`datasets.load_dataset` can read ({type(err).__name__}: {first})") from None


def train_part(opened: Any, argument: str) -> Any:
    """The training data of an opened source: its files, or its `train` split."""
    if isinstance(opened, Path):
        return _folder_files(opened, want_val=False)
    if is_dataset_dict(opened):
        if TRAIN_SPLIT not in opened:
            raise DataError(f"{argument}: a DatasetDict without a {TRAIN_SPLIT!r} split (splits: {', '.join(opened)}); "
                            "pass the split, e.g. ds['train']")
        return opened[TRAIN_SPLIT]
    return opened


def eval_part(opened: Any) -> Any:
    """The validation data that comes with an opened training source (a folder's val/test files,
    a DatasetDict's validation or test split), or None."""
    if isinstance(opened, Path):
        return _folder_files(opened, want_val=True) or None
    if is_dataset_dict(opened):
        return next((opened[name] for name in EVAL_SPLITS if name in opened), None)
    return None


def dataset_to_parquet(dataset: Any, folder: Path) -> str:
    """The Dataset as `<folder>/<fingerprint>.parquet`, written once: the next run with the same
    data finds the same file (and the token cache its tokens). Written to a temporary name and
    renamed, so ranks writing at once leave one complete file."""
    fingerprint = getattr(dataset, "_fingerprint", None)
    if not fingerprint:
        raise DataError("a datasets.Dataset without a fingerprint cannot be cached; save it with ds.to_parquet(...) and pass the file")
    final = folder / f"{fingerprint}-{dataset.num_rows}.parquet"
    if final.is_file():
        return str(final)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{final.name}.tmp-{socket.gethostname()}-{os.getpid()}"
    try:
        dataset.to_parquet(str(tmp))
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return str(final)


def as_files(data: Any, argument: str, cache_dir: str) -> list[str]:
    """The parquet/JSONL files of a `Dataset` or list of files (a `train_part`/`eval_part`)."""
    if is_dataset(data):
        if data.num_rows == 0:
            raise DataError(f"{argument}: the dataset has no rows")
        return [dataset_to_parquet(data, Path(cache_dir).expanduser() / "datasets")]
    if is_dataset_dict(data):
        return as_files(train_part(data, argument), argument, cache_dir)
    if not data:
        raise DataError(f"{argument}: no .parquet or .jsonl files")
    return list(data)


def train_and_eval_files(train: Any, evaluation: Any, cache_dir: str) -> tuple[list[str], Optional[list[str]]]:
    """(training files, validation files or None) of TRL's `train_dataset` and `eval_dataset`;
    without `eval_dataset`, the validation split or files that come with `train_dataset`."""
    opened = open_source(train, "train_dataset")
    train_files = as_files(train_part(opened, "train_dataset"), "train_dataset", cache_dir)
    if evaluation is not None:
        opened_eval = open_source(evaluation, "eval_dataset")
        val = eval_part(opened_eval) if is_dataset_dict(opened_eval) or isinstance(opened_eval, Path) else opened_eval
        if val is None:
            raise DataError(f"eval_dataset: no validation split or val/test files in {evaluation!r}")
    else:
        val = eval_part(opened)
    return train_files, (as_files(val, "eval_dataset", cache_dir) if val is not None else None)
