"""The files a run on the dask engine passes from its workers to the client.

Each worker writes what its partition decided and rendered under
``<workspace>/.loyalty/runs/<run id>/``, one file per partition and kind: JSON Lines
compressed with zstd (``offers-0003.jsonl.zst``: each line a JSON array of up to
``BATCH`` records), or Parquet for frames (``tier_moves-0003.parquet``). A file is written
under a temporary name and renamed when complete, so a half-written file is never read. The
client streams them into the state store in one transaction and deletes the folder after
the commit; the folders of attempts that crashed are deleted by the next run.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

BATCH = 5_000             # records per line of a JSON Lines file
CHUNK = 20_000            # offers per chunk the client records at a time


def runs_folder(root: Path | str) -> Path:
    return Path(root) / ".loyalty" / "runs"


def run_folder(root: Path | str, run_id: str) -> Path:
    """Where the workers of run ``run_id`` write their files."""
    return runs_folder(root) / run_id


def file_name(kind: str, number: int, suffix: str = "jsonl.zst") -> str:
    return f"{kind}-{number:04d}.{suffix}"


def write_records(folder: Path, name: str, records: Iterable) -> str | None:
    """``records`` (JSON values) as zstd-compressed JSON Lines, ``BATCH`` a line; None
    (and no file) without records."""
    records = list(records) if not isinstance(records, list) else records
    if not records:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".{name}.{os.getpid()}.tmp"
    with pa.CompressedOutputStream(str(temporary), "zstd") as out:
        for start in range(0, len(records), BATCH):
            out.write(orjson.dumps(records[start:start + BATCH], option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
    os.replace(temporary, folder / name)
    return name


def read_records(path: Path) -> Iterator[list]:
    """The records of a ``write_records`` file, a line (up to ``BATCH``) at a time."""
    with io.BufferedReader(pa.input_stream(str(path), compression="zstd"), 1 << 20) as lines:
        for line in lines:
            yield orjson.loads(line)


def write_frame(folder: Path, name: str, frame: pd.DataFrame) -> str | None:
    """A frame as Parquet; None (and no file) without rows."""
    if frame is None or not len(frame):
        return None
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".{name}.{os.getpid()}.tmp"
    pq.write_table(pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False), temporary)
    os.replace(temporary, folder / name)
    return name


def read_frame(path: Path) -> pd.DataFrame:
    """A ``write_frame`` file; text columns as objects with None for missing values, as
    the frames were made."""
    frame = pq.read_table(path).to_pandas()
    for name in frame.columns:
        if pd.api.types.is_string_dtype(frame[name]):
            values = frame[name].astype(object)
            frame[name] = values.where(values.notna(), None)
    return frame


def chunks(batches: Iterable[list], size: int = CHUNK) -> Iterator[list]:
    """Batches regrouped into chunks of about ``size`` records."""
    chunk: list = []
    for batch in batches:
        chunk.extend(batch)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def clear_runs(root: Path | str, keep: str | None = None) -> None:
    """Delete the run folders (all but ``keep``'s): those of attempts that crashed before
    recording, or of a run already recorded. Call under the run lock."""
    folder = runs_folder(root)
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.name != keep:
            shutil.rmtree(path, ignore_errors=True)
