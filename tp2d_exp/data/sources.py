"""Where documents come from: one `Source` per corpus (a job has one, or several under `data.source=mixture`),
read as a stream of document batches in corpus order, never the whole corpus in memory.

A document is one non-empty (after strip) text: a line of a .txt file (lines as `str.splitlines` cuts them,
which is what both Hugging Face's text builder and Ray Data's `read_text` do), or the `text_field` of one row
of a .jsonl/.json/.parquet file, a `datasets.save_to_disk` dir or a Hugging Face dataset (hub id or local
data dir; `data.streaming` reads a hub dataset without downloading it first).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from tp2d_exp.config.errors import ConfigError, first_line
from tp2d_exp.config.schema import DataSource
from tp2d_exp.storage import file_version, open_file

FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
TEXT_CHUNK_CHARS = 1 << 22  # a .txt file is decoded 4 M characters at a time
BATCH_CHARS = 1 << 21  # ~2 MB of text per batch: what one tokenizer task gets


@dataclass(frozen=True)
class Source:
    """One corpus, as the store builder needs it. `key`: where the user configured it (`data`, or
    `data.mixture[i]`), named in every error about it."""

    key: str
    kind: DataSource  # synthetic | text_files | hf | store (a built store: nothing to read)
    files: tuple[str, ...] = ()  # text_files: absolute paths, in corpus order
    path: Optional[str] = None  # text_files: what the user gave (for messages)
    hf_name: Optional[str] = None
    hf_config: Optional[str] = None
    split: str = "train"
    text_field: str = "text"
    streaming: bool = False
    synthetic_documents: int = 0
    weight: float = 1.0

    @property
    def name(self) -> str:
        if self.kind is DataSource.synthetic:
            return f"synthetic-{self.synthetic_documents}"
        return (self.hf_name if self.kind is DataSource.hf else self.path) or ""

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the source's documents without reading them: files by (path, size, version), a
        local dataset dir (save_to_disk or data files) by every file's, a hub dataset by id, config and split
        (a new revision of it under the same name is not seen: pin one in the HF cache)."""
        parts: dict[str, Any] = {"kind": str(self.kind), "text_field": self.text_field}
        if self.kind is DataSource.text_files:
            parts["files"] = [(f, *file_version(f)) for f in self.files]
        elif self.kind is DataSource.hf:
            parts.update(hf_name=self.hf_name, hf_config=self.hf_config, split=self.split)
            local = Path(os.path.expanduser(self.hf_name or ""))
            if self.hf_name and local.is_dir():
                parts["files"] = sorted((str(f.relative_to(local)), *file_version(str(f)))
                                        for f in local.rglob("*") if f.is_file())
        else:
            from tp2d_exp.data import synthetic

            parts["documents"] = self.synthetic_documents
            parts["words"] = hashlib.sha1(synthetic.WORDS_FILE.read_bytes()).hexdigest()
        return parts


def documents(src: Source, limit: Optional[int] = None) -> Iterator[list[str]]:
    """The source's documents in corpus order, in batches of about BATCH_CHARS; at most `limit` of them."""
    left = math.inf if limit is None else limit
    for batch in _batched(_texts(src)):
        if len(batch) >= left:
            yield batch[:int(left)]
            return
        left -= len(batch)
        yield batch


def count_documents(src: Source) -> int:
    return sum(len(b) for b in documents(src))


def is_document(text: Any) -> bool:
    return isinstance(text, str) and bool(text.strip())  # also tp2d_exp.data.encode.RayTokenizer's rule


def _batched(texts: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for t in texts:
        if not is_document(t):
            continue
        batch.append(t)
        chars += len(t)
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _texts(src: Source) -> Iterator[Any]:
    if src.kind is DataSource.synthetic:
        from tp2d_exp.data import synthetic

        yield from synthetic.documents(src.synthetic_documents, seed=0)
    elif src.kind is DataSource.text_files:
        for f in src.files:
            try:
                yield from _file_texts(src, f)
            except ConfigError:
                raise
            except UnicodeDecodeError as e:  # past the start validation sniffed
                raise ConfigError(f"{src.key}.path={src.path!r}: {f} is not UTF-8 text ({e.reason} at byte {e.start} "
                                  "of a chunk); convert it or leave it out") from e
            except (OSError, ValueError) as e:
                raise ConfigError(f"{src.key}.path={src.path!r}: {f} could not be read ({type(e).__name__}: "
                                  f"{first_line(e)}); check or leave out this file") from e
    else:
        yield from _hf_texts(src)


def _file_texts(src: Source, f: str) -> Iterator[Any]:
    suffix = Path(f).suffix
    if suffix == ".txt":
        yield from text_lines(f)
    elif suffix == ".jsonl":
        with open_file(f, "r", encoding="utf-8") as lines:
            checked = False
            for line in lines:
                if line.strip():
                    row = json.loads(line)
                    if not checked:  # the first row names the columns
                        _require_field(src, f, list(row) if isinstance(row, dict) else [])
                        checked = True
                    yield row.get(src.text_field) if isinstance(row, dict) else None
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        with open_file(f) as raw:
            pf = pq.ParquetFile(raw)
            _require_field(src, f, pf.schema_arrow.names)
            for batch in pf.iter_batches(columns=[src.text_field], batch_size=4096):
                yield from batch.column(0).to_pylist()
    else:  # .json: a JSON array or object of rows, parsed by datasets' json builder into its Arrow cache
        yield from _dataset_texts(src, _load("json", data_files=[f], split="train"), f)


def text_lines(path: str) -> Iterator[str]:
    """The lines of a UTF-8 text file, cut exactly as `str.splitlines` cuts the whole text (Ray Data's
    read_text does that), read a chunk at a time."""
    with open_file(path, "r", encoding="utf-8", newline="") as f:  # newline="": no translation, splitlines decides
        carry = ""
        while chunk := f.read(TEXT_CHUNK_CHARS):
            lines = (carry + chunk).splitlines(keepends=True)
            # The last line may go on in the next chunk; a trailing "\r" may be half of "\r\n".
            carry = lines.pop() if lines and (lines[-1][-1:] not in "\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
                                              or lines[-1].endswith("\r")) else ""
            yield from (line.rstrip("\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029") for line in lines)
        if carry:
            yield from carry.splitlines()


def _saved_state(path: str) -> Optional[Path]:
    """A `datasets.save_to_disk` dir's marker file (a Dataset's state.json, a DatasetDict's dataset_dict.json)."""
    p = Path(os.path.expanduser(path))
    return next((p / m for m in ("state.json", "dataset_dict.json") if (p / m).is_file()), None)


def _load(*args: Any, **kwargs: Any) -> Any:
    import datasets

    datasets.disable_progress_bars()
    return datasets.load_dataset(*args, **kwargs)


def _hf_texts(src: Source) -> Iterator[Any]:
    import datasets

    what = f"{src.key}.hf_name={src.hf_name!r}"
    try:
        if _saved_state(src.hf_name or ""):
            ds = datasets.load_from_disk(os.path.expanduser(src.hf_name))
            if isinstance(ds, datasets.DatasetDict):
                if src.split not in ds:
                    raise ConfigError(f"{src.key}.split={src.split!r} is not a split of the saved dataset "
                                      f"{src.hf_name!r} (splits: {list(ds)}); set {src.key}.split")
                ds = ds[src.split]
        else:
            ds = _load(src.hf_name, src.hf_config, split=src.split, streaming=src.streaming)
    except ConfigError:
        raise
    except Exception as e:  # the names are the user's input: whatever datasets raises on them is a bad value
        cause = e.__cause__ or e
        raise ConfigError(f"{what} ({src.key}.hf_config={src.hf_config!r}, {src.key}.split={src.split!r}) could not "
                          f"be loaded ({type(cause).__name__}: {first_line(cause)}); check these keys, the network "
                          "or the HF cache") from e
    yield from _dataset_texts(src, ds, src.hf_name or "")


def _dataset_texts(src: Source, ds: Any, where: str) -> Iterator[Any]:
    columns = ds.column_names
    if columns is not None:  # a streamed dataset may not know its columns before the first row
        _require_field(src, where, columns)
    for batch in ds.iter(batch_size=1024):
        if src.text_field not in batch:
            _require_field(src, where, list(batch))
        yield from batch[src.text_field]


def _require_field(src: Source, where: str, columns: list[str]) -> None:
    if src.text_field not in columns:
        raise ConfigError(f"{src.key}.text_field={src.text_field!r} is not a column of {where} (columns: "
                          f"{columns}); set {src.key}.text_field")
