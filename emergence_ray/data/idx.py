"""The MNIST-style IDX format (unsigned bytes; gzipped or not), in numpy alone: no Ray, so the
benchmarks on a bare GPU machine read Fashion-MNIST with the service's own reader."""

from __future__ import annotations

import gzip

import numpy as np
import pyarrow.fs as pafs

from emergence_ray.errors import DataError


def read_idx(fs: pafs.FileSystem, path: str) -> np.ndarray:
    with fs.open_input_stream(path, compression=None) as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise DataError(f"{path}: corrupt or truncated gzip file ({err}); download it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    dims = np.frombuffer(raw, ">u4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: truncated IDX file ({data.size} bytes of {int(np.prod(dims))})")
    return data.reshape(dims)
