"""A materialized dataset handed to training workers as refs to its blocks in the object store.

For shards that fit in worker memory (`data.ingest=cache`/auto), the driver passes each split as
`BlockShards` in the train loop config instead of `TorchTrainer(datasets=...)`. Every worker then
reads its own contiguous rows straight from the object store, once, with `ray.get`. No Ray Data
executor runs after the driver's `materialize()`: no DatasetManager and no SplitCoordinator actor
per split. Each such actor cost a process start and ~1.5 CPU-seconds on the critical path to the
first step (on 2 cores: the shard came 3-4 s after the workers were up), and then kept waking every
10 ms during training. Streamed shards (`data.ingest=stream`) still go through `datasets=`.

    shards = BlockShards.of(ds.materialize())       # driver
    arrays = shards.read(world=2, rank=0)            # worker: {"image": ndarray, "label": ndarray}

The split is computed in the worker from the world size it runs with, so an elastic run that
resizes re-splits by itself. The train split is already shuffled (sources split by seeded
permutation), so contiguous rows are a random sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ray
from ray.data.block import BlockAccessor


@dataclass(frozen=True)
class BlockShards:
    refs: tuple  # ObjectRef[Block] of the materialized dataset, in row order
    rows: tuple[int, ...]  # rows per block

    @classmethod
    def of(cls, ds: ray.data.Dataset) -> BlockShards:
        """`ds` must be materialized (else this executes it); its blocks stay owned by the driver."""
        refs, rows = [], []
        for bundle in ds.iter_internal_ref_bundles():
            for ref, meta in zip(bundle.block_refs, bundle.metadata):
                if meta.num_rows:
                    refs.append(ref)
                    rows.append(int(meta.num_rows))
        return cls(tuple(refs), tuple(rows))

    @property
    def total(self) -> int:
        return sum(self.rows)

    def span(self, world: int, rank: int, equal: bool = True) -> tuple[int, int]:
        """Rows [start, stop) of `rank`. equal: floor(total / world) rows each, the remainder
        dropped (DDP steps stay in lockstep); otherwise every row, the shards differing by one."""
        if equal:
            per = self.total // world
            return rank * per, (rank + 1) * per
        return rank * self.total // world, (rank + 1) * self.total // world

    def read(self, world: int, rank: int, columns: tuple[str, ...] = ("image", "label"),
             equal: bool = True) -> dict[str, np.ndarray]:
        """This rank's rows as one array per column, copied out of the object store block by block
        (only the blocks that overlap the span are fetched; memory peaks at shard + one block)."""
        start, stop = self.span(world, rank, equal)
        out: dict[str, np.ndarray] = {}
        first = 0  # row number of the current block's first row
        for ref, n in zip(self.refs, self.rows):
            lo, hi = max(start, first), min(stop, first + n)
            if lo < hi:
                block = BlockAccessor.for_block(ray.get(ref)).slice(lo - first, hi - first)
                batch = BlockAccessor.for_block(block).to_batch_format("numpy")
                for c in columns:
                    if c not in out:
                        out[c] = np.empty((stop - start, *batch[c].shape[1:]), batch[c].dtype)
                    out[c][lo - start:hi - start] = batch[c]
                del block, batch
            first += n
        return out or {c: np.empty((0,)) for c in columns}  # an empty span (more ranks than rows)
