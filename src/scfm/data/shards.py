"""Parquet shards of aligned cells, and the streaming dataset that training reads them with.

Layout of a shard directory (see docs/architecture.md)::

    part-00000.parquet   one row per cell: cell_id string, gene_ids list<int32> (vocabulary token ids
    part-00001.parquet   of the nonzero genes, ascending), counts list<float32>, total_counts float32
    ...                  (sum of the cell's aligned counts), then the chosen obs columns
    manifest.json        {schema_version, vocab_sha256, n_genes, n_cells, obs_columns,
                          shards: [{path, n_cells}], row_group_size, scfm_version}

Each shard holds ``cells_per_shard`` cells (the last one fewer), written in Parquet row groups of
``row_group_size`` cells. The directory appears only once complete (written under a temporary name).

How :class:`ShardDataset` splits, mixes and resumes
----------------------------------------------------
* **Pieces.** The unit of work is a *piece*: one of ``row_group_slices`` random slices of one Parquet
  row group (a row group's cells are dealt into slices by a permutation seeded by ``(seed, epoch,
  row group)``). Each epoch the list of all pieces (over every shard directory) is permuted with a
  generator seeded by ``(seed, epoch)`` — the same on every rank and worker.
* **Split.** With ``world_size`` ranks and ``W`` DataLoader workers there are ``world_size × W``
  consumers; consumer ``c = rank × W + worker`` takes pieces ``c, c + world_size × W, …`` of that
  list. Every cell goes to exactly one consumer: no duplicates, no gaps.
* **Mixing.** A consumer reads its pieces in *rounds* of ``mix_row_groups`` pieces: the cells of a
  round's pieces are pooled and handed out in an order permuted by ``(seed, epoch, consumer,
  round)``. A row group holds consecutive cells of one sample (often of one batch or cell type); a
  round holds slices of ``mix_row_groups`` row groups drawn from anywhere in the data, so any window
  of cells — e.g. the next micro-batches — mixes that many samples instead of one. Reading a row
  group once per slice costs ``row_group_slices`` reads per row group and epoch; it buys
  ``row_group_slices`` times more row groups in the same memory.
* **Memory.** A consumer holds one round: at most ``mix_row_groups × ceil(row_group_size /
  row_group_slices)`` cells (65,536 cells with the defaults of 256 pieces, 4 slices and the writer's
  1,024-cell row groups: ~1 GiB at 2,000 nonzero genes per cell, 8 bytes per nonzero gene), plus one
  row group while it is being sliced. ``peak_cells_held`` records the largest round so far. Halve
  ``mix_row_groups`` to halve it.
* **Measured mixing.** ``tests/data/test_shards.py`` counts the distinct source files and row groups
  in windows of 1,024 consecutive cells and compares them with what a uniform shuffle of all cells
  gives; ``bench/RESULTS.md`` ("Data mixing") has the figures.
* **No shuffling** (``shuffle=False``): whole row groups in file order, cells in file order.
* **Epochs.** ``set_epoch(e)`` chooses the epoch; with ``loop=True`` the iterator runs on into epoch
  ``e + 1``, ``e + 2``, … (a new order each time), with ``loop=False`` it stops after one epoch.
* **Resume.** ``state_dict()`` = {epoch, position} of the cells handed out so far (position = cells of
  the current epoch); ``load_state_dict()`` restarts there: the round holding that position is
  rebuilt from the piece sizes alone (no earlier round is read) and the resumed iterator yields
  exactly the rest of the uninterrupted sequence, in the same order. Exact resume is for
  ``num_workers=0`` (training's setting: the position is tracked in the process that iterates); with
  workers each worker tracks its own copy, which the main process does not see.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
import torch

from scfm.data.vocab import Vocabulary
from scfm.errors import ScfmError
from scfm.utils import atomic_output

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
CORE_COLUMNS = ("cell_id", "gene_ids", "counts", "total_counts")


# ------------------------------------------------------------------------------------------- writer
class ShardWriter:
    """Write aligned cells ([cells, len(vocab)] CSR counts) as Parquet shards plus a manifest.

    Use as a context manager, or call :meth:`close` (success) / :meth:`abort` (failure) yourself.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        vocab: Vocabulary,
        obs_columns: Sequence[str] = (),
        cells_per_shard: int = 100_000,
        row_group_size: int = 1024,
    ):
        if cells_per_shard < 1 or row_group_size < 1:
            raise ScfmError(f"cells_per_shard and row_group_size must be positive, got {cells_per_shard}, {row_group_size}")
        clash = [c for c in obs_columns if c in CORE_COLUMNS]
        if clash:
            raise ScfmError(f"obs column(s) {', '.join(clash)} clash with the shard's own columns", out_dir)
        self.out_dir = Path(out_dir)
        self.vocab = vocab
        self.obs_columns = list(obs_columns)
        self.cells_per_shard = cells_per_shard
        self.row_group_size = min(row_group_size, cells_per_shard)
        self._atomic = atomic_output(self.out_dir)
        self._tmp = self._atomic.__enter__()
        self._tmp.mkdir()
        self._schema: pa.Schema | None = None
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_shard = 0
        self._shards: list[dict] = []
        self._done = False

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            self.abort(exc_type, exc, tb)
        return False

    # ---------------------------------------------------------------- input
    def write(self, cell_ids: Sequence[str], csr: sp.spmatrix, obs_df: pd.DataFrame | None = None) -> None:
        csr = sp.csr_matrix(csr, dtype=np.float32)
        if not csr.has_canonical_format:  # ascending gene ids, one entry per gene; never edit the caller's matrix
            csr = csr.copy()
            csr.sum_duplicates()
        if csr.shape[1] != len(self.vocab):
            raise ValueError(f"matrix has {csr.shape[1]} genes, the vocabulary {len(self.vocab)}")
        if len(cell_ids) != csr.shape[0]:
            raise ValueError(f"{len(cell_ids)} cell ids for {csr.shape[0]} rows")
        if csr.shape[0] == 0:
            return
        missing = [c for c in self.obs_columns if obs_df is None or c not in obs_df.columns]
        if missing:
            raise ScfmError(f"obs column(s) {', '.join(missing)} not found in the input", self.out_dir)
        table = self._to_table(cell_ids, csr, obs_df)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self._flush(final=False)

    def _to_table(self, cell_ids, csr: sp.csr_matrix, obs_df) -> pa.Table:
        # no copies where the dtypes already fit: a block of 10,000 cells is tens of MB per array
        offsets = pa.array(csr.indptr.astype(np.int32, copy=False))
        columns = {
            "cell_id": pa.array([str(c) for c in cell_ids], type=pa.string()),
            "gene_ids": pa.ListArray.from_arrays(offsets, pa.array(csr.indices.astype(np.int32, copy=False))),
            "counts": pa.ListArray.from_arrays(offsets, pa.array(csr.data.astype(np.float32, copy=False))),
            "total_counts": pa.array(np.asarray(csr.sum(axis=1)).ravel().astype(np.float32)),
        }
        for name in self.obs_columns:
            values = obs_df[name]
            if isinstance(values.dtype, pd.CategoricalDtype) or values.dtype == object:
                values = values.astype(str)  # one string type whatever each chunk's categories are
            columns[name] = pa.array(values.to_numpy())
        table = pa.table(columns)
        if self._schema is None:
            self._schema = table.schema
        return table.cast(self._schema)

    # ---------------------------------------------------------------- output
    def _flush(self, final: bool) -> None:
        while self._pending_rows > 0:
            room = self.cells_per_shard - self._rows_in_shard
            take = min(self.row_group_size, room)
            if self._pending_rows < take and not final:
                return
            take = min(take, self._pending_rows)
            rows = pa.concat_tables(self._pending)
            self._pending = [rows.slice(take)] if rows.num_rows > take else []
            self._pending_rows -= take
            self._write_row_group(rows.slice(0, take))

    def _write_row_group(self, rows: pa.Table) -> None:
        if self._writer is None:
            name = f"part-{len(self._shards):05d}.parquet"
            self._writer = pq.ParquetWriter(self._tmp / name, self._schema)
            self._shards.append({"path": name, "n_cells": 0})
        self._writer.write_table(rows, row_group_size=rows.num_rows)
        self._rows_in_shard += rows.num_rows
        self._shards[-1]["n_cells"] += rows.num_rows
        if self._rows_in_shard == self.cells_per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._rows_in_shard = 0

    @property
    def n_cells(self) -> int:
        return sum(s["n_cells"] for s in self._shards) + self._pending_rows

    def close(self) -> dict:
        """Write the remaining cells and the manifest, then move the directory into place."""
        from scfm import __version__

        if self._done:
            raise RuntimeError("ShardWriter is already closed")
        try:
            self._flush(final=True)
            self._close_shard()
            if not self._shards:
                raise ScfmError("no cells to write", self.out_dir)
            manifest = {
                "schema_version": SCHEMA_VERSION,
                "vocab_sha256": self.vocab.sha256,
                "n_genes": len(self.vocab),
                "n_cells": self.n_cells,
                "obs_columns": self.obs_columns,
                "shards": self._shards,
                "row_group_size": self.row_group_size,
                "scfm_version": __version__,
            }
            (self._tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        except BaseException as exc:
            self.abort(type(exc), exc, exc.__traceback__)
            raise
        self._done = True
        self._atomic.__exit__(None, None, None)
        return manifest

    def abort(self, exc_type=None, exc=None, tb=None) -> None:
        """Drop everything written so far (the output directory never appears)."""
        if self._done:
            return
        self._done = True
        if self._writer is not None:
            self._writer.close()
        exc = exc or RuntimeError("shard writing aborted")
        try:
            self._atomic.__exit__(exc_type or type(exc), exc, tb)
        except BaseException as raised:
            if raised is not exc:
                raise


# ------------------------------------------------------------------------------------------ manifest
def read_manifest(path: str | os.PathLike) -> dict:
    """Load and validate ``<dir>/manifest.json`` (or the manifest file itself); adds ``"dir"``."""
    path = Path(path)
    file = path / MANIFEST if path.is_dir() else path
    if not file.is_file():
        raise ScfmError("no shard manifest (manifest.json) found", file)
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ScfmError(f"manifest is not valid JSON ({exc})", file) from exc
    if not isinstance(manifest, dict):
        raise ScfmError("manifest is not a JSON object", file)
    required = {"schema_version": int, "vocab_sha256": str, "n_genes": int, "n_cells": int,
                "obs_columns": list, "shards": list}
    for key, kind in required.items():
        if not isinstance(manifest.get(key), kind):
            raise ScfmError(f"manifest field {key!r} is missing or not a {kind.__name__}", file)
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise ScfmError(f"unsupported shard schema_version {manifest['schema_version']} (expected {SCHEMA_VERSION})", file)
    total = 0
    for entry in manifest["shards"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not isinstance(entry.get("n_cells"), int):
            raise ScfmError(f"bad shard entry {entry!r} (expected {{path, n_cells}})", file)
        if not (file.parent / entry["path"]).is_file():
            raise ScfmError(f"shard {entry['path']} listed in the manifest does not exist", file)
        total += entry["n_cells"]
    if total != manifest["n_cells"]:
        raise ScfmError(f"shards hold {total} cells but the manifest says n_cells={manifest['n_cells']}", file)
    manifest["dir"] = str(file.parent)
    return manifest


# ------------------------------------------------------------------------------------------- dataset
class ShardDataset(torch.utils.data.IterableDataset):
    """Stream cells from one or more shard directories (see the module docstring for the contract).

    Yields ``{"cell_id": str, "gene_ids": np.int32[nnz], "counts": np.float32[nnz],
    "total_counts": float}`` plus the requested ``obs_columns``.
    """

    def __init__(
        self,
        shard_dirs_or_manifest: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        mix_row_groups: int = 256,
        row_group_slices: int = 4,
        loop: bool = True,
        obs_columns: Sequence[str] = (),
    ):
        super().__init__()
        sources = (
            [shard_dirs_or_manifest]
            if isinstance(shard_dirs_or_manifest, (str, os.PathLike))
            else list(shard_dirs_or_manifest)
        )
        if not sources:
            raise ScfmError("no shard directories given")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if mix_row_groups < 1 or row_group_slices < 1:
            raise ScfmError(f"mix_row_groups and row_group_slices must be at least 1, got {mix_row_groups}, "
                            f"{row_group_slices}")
        self.manifests = [read_manifest(s) for s in sources]
        first = self.manifests[0]
        for other in self.manifests[1:]:
            if other["vocab_sha256"] != first["vocab_sha256"] or other["n_genes"] != first["n_genes"]:
                raise ScfmError(
                    f"shards were aligned to a different vocabulary (vocab_sha256 {other['vocab_sha256'][:12]}… "
                    f"vs {first['vocab_sha256'][:12]}… in {first['dir']})",
                    other["dir"],
                )
        for manifest in self.manifests:
            missing = [c for c in obs_columns if c not in manifest["obs_columns"]]
            if missing:
                raise ScfmError(f"obs column(s) {', '.join(missing)} are not in these shards", manifest["dir"])
        self.vocab_sha256 = first["vocab_sha256"]
        self.n_genes = first["n_genes"]
        self.n_cells = sum(m["n_cells"] for m in self.manifests)
        self.obs_columns = list(obs_columns)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.loop = shuffle, loop
        self.mix_row_groups = int(mix_row_groups) if shuffle else 1
        self.row_group_slices = int(row_group_slices) if shuffle else 1
        self.row_groups = self._row_groups()  # [(file, row_group, n_cells)] in file order
        self.epoch = 0
        self.position = 0
        self.peak_cells_held = 0

    def _row_groups(self) -> list[tuple[str, int, int]]:
        units = []
        for manifest in self.manifests:
            for entry in manifest["shards"]:
                file = os.path.join(manifest["dir"], entry["path"])
                try:
                    meta = pq.ParquetFile(file).metadata
                except Exception as exc:
                    raise ScfmError(f"not a readable Parquet shard ({exc})", file) from exc
                if meta.num_rows != entry["n_cells"]:
                    raise ScfmError(f"shard has {meta.num_rows} cells, the manifest says {entry['n_cells']}", file)
                units += [(file, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
        return units

    # ---------------------------------------------------------------- position
    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "n_cells": self.n_cells, **self._mixing()}

    def _mixing(self) -> dict:
        return {"shuffle": self.shuffle, "mix_row_groups": self.mix_row_groups,
                "row_group_slices": self.row_group_slices}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "world_size", "n_cells", "shuffle", "mix_row_groups", "row_group_slices"):
            if state.get(key) != getattr(self, key):
                raise ScfmError(f"loader state is for {key}={state.get(key)}, this dataset has {getattr(self, key)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    # ---------------------------------------------------------------- order
    def _consumer(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        return self.rank * workers + worker, self.world_size * workers

    def _slice_sizes(self, n_rows: int) -> list[int]:
        slices = min(self.row_group_slices, n_rows)
        edges = [n_rows * j // slices for j in range(slices + 1)]
        return [b - a for a, b in zip(edges, edges[1:])]

    def epoch_pieces(self, epoch: int, consumer: int, n_consumers: int) -> list[tuple[int, int, int]]:
        """The pieces one consumer reads in ``epoch``, in reading order: (row group index, slice, n_cells)."""
        pieces = [(g, j, n) for g, (_, _, rows) in enumerate(self.row_groups)
                  for j, n in enumerate(self._slice_sizes(rows))]
        order = np.arange(len(pieces))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(pieces))
        return [pieces[i] for i in order[consumer::n_consumers]]

    def _slice_rows(self, epoch: int, group: int, piece: int) -> np.ndarray:
        """Row indices (ascending) of one slice of a row group."""
        n_rows = self.row_groups[group][2]
        if self.row_group_slices == 1:
            return np.arange(n_rows)
        dealt = np.random.default_rng([self.seed, epoch, group, 1]).permutation(n_rows)
        sizes = self._slice_sizes(n_rows)
        start = sum(sizes[:piece])
        return np.sort(dealt[start : start + sizes[piece]])

    def _pool_order(self, epoch: int, consumer: int, round_: int, size: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(size)
        return np.random.default_rng([self.seed, epoch, consumer, round_]).permutation(size)

    # ---------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[dict]:
        consumer, n_consumers = self._consumer()
        while True:
            epoch = self.epoch
            for cell in self._epoch_cells(epoch, consumer, n_consumers, start=self.position):
                self.position += 1
                yield cell
            if not self.loop:
                return
            if self.position == 0 and not self.epoch_pieces(epoch, consumer, n_consumers):
                return  # this consumer has no data at all: looping would spin forever
            self.epoch, self.position = epoch + 1, 0

    def _epoch_cells(self, epoch: int, consumer: int, n_consumers: int, start: int) -> Iterator[dict]:
        pieces = self.epoch_pieces(epoch, consumer, n_consumers)
        rounds = [pieces[i : i + self.mix_row_groups] for i in range(0, len(pieces), self.mix_row_groups)]
        first_cell = 0
        for round_, members in enumerate(rounds):
            size = sum(n for _, _, n in members)
            if first_cell + size <= start:  # handed out before a resume: not even read
                first_cell += size
                continue
            pool = self._read_pool(epoch, members)
            skip = max(0, start - first_cell)
            for i in self._pool_order(epoch, consumer, round_, size)[skip:]:
                yield pool[i]
            first_cell += size

    def _read_pool(self, epoch: int, members: list[tuple[int, int, int]]) -> list[dict]:
        """The cells of one round's pieces, in piece order; one row group in memory at a time."""
        columns = [*CORE_COLUMNS, *self.obs_columns]
        offsets = np.concatenate([[0], np.cumsum([n for _, _, n in members])])
        pool: list = [None] * int(offsets[-1])
        by_group: dict[int, list[int]] = {}
        for k, (group, _, _) in enumerate(members):
            by_group.setdefault(group, []).append(k)
        files: dict[str, pq.ParquetFile] = {}
        for group in sorted(by_group):  # file order: sequential reads
            file, row_group, _ = self.row_groups[group]
            if file not in files:
                files[file] = pq.ParquetFile(file)
            table = files[file].read_row_group(row_group, columns=columns)
            for k in by_group[group]:
                rows = self._slice_rows(epoch, group, members[k][1])
                pool[offsets[k] : offsets[k + 1]] = _table_rows(table.take(pa.array(rows)), 0, self.obs_columns)
        self.peak_cells_held = max(self.peak_cells_held, len(pool))
        return pool


def _table_rows(table: pa.Table, offset: int, obs_columns: Sequence[str]) -> Iterator[dict]:
    ids = table.column("cell_id").to_pylist()
    totals = table.column("total_counts").to_numpy()
    genes = table.column("gene_ids").combine_chunks()
    counts = table.column("counts").combine_chunks()
    g_off, g_val = genes.offsets.to_numpy(), genes.values.to_numpy()
    c_off, c_val = counts.offsets.to_numpy(), counts.values.to_numpy()
    obs = {c: table.column(c).to_pylist() for c in obs_columns}
    for i in range(offset, table.num_rows):
        row = {
            "cell_id": ids[i],
            "gene_ids": np.array(g_val[g_off[i] : g_off[i + 1]], dtype=np.int32),
            "counts": np.array(c_val[c_off[i] : c_off[i + 1]], dtype=np.float32),
            "total_counts": float(totals[i]),
        }
        for c in obs_columns:
            row[c] = obs[c][i]
        yield row
