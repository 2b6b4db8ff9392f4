"""Ranges of a local Zarr-format-3 1-D array read straight from its chunk files, checked and decoded with numcodecs.

zarr-python reads a chunk through an async pipeline (event loop, buffer prototypes, codec objects per chunk) whose
CPU cost is several times that of reading the file, checking its crc32c and Blosc-decoding it
(benchmarks/history/issue-27.md). `ChunkFileReader` does just those three steps for the arrays our writer
makes: Zarr format 3, a regular 1-D chunk grid, codecs bytes (little-endian) -> blosc -> crc32c, on a local
directory. Any other array (format 2, another codec chain, sharding, a remote store) gets no reader and is read by
zarr as before.

The checks are the ones zarr makes: the chunk's crc32c (its last 4 bytes, little-endian, over the bytes before them)
and a decoded size of exactly one chunk. A chunk that is absent or fails either check raises `ChunkReadFailed`;
the caller then reads the range through zarr, which raises the precise error (or, where an absent chunk means
zeros, gives them).
"""

from __future__ import annotations

import os
import sys
import threading

import google_crc32c
import numpy as np
import zarr
from numcodecs import blosc
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.storage import LocalStore, WrapperStore

CHECKSUM_BYTES = 4


class ChunkReadFailed(Exception):
    """A chunk could not be read or did not check out (args[0]: the reason); zarr is to read it and say why."""


class ChunkFileReader:
    """array[start:stop] for one local 1-D Zarr-v3 array whose chunks are blosc-compressed with a crc32c checksum.

    Thread-safe: each thread decodes partial chunks into a scratch buffer of its own (one chunk, reused).
    """

    def __init__(self, array: zarr.Array, directory: str):
        self.dtype = array.dtype
        self.length = int(array.shape[0])
        self.chunk_len = int(array.chunks[0])
        self._array = array  # for its chunk key encoding
        self._directory = directory
        self._chunk_bytes = self.chunk_len * self.dtype.itemsize
        self._scratch = threading.local()

    def read(self, start: int, stop: int) -> np.ndarray:
        """The values [start, stop) (stop clipped to the array's length, as a slice is), decoded from every chunk
        they touch once each."""
        stop = min(stop, self.length)
        if not 0 <= start <= stop:
            raise IndexError(f"range [{start}, {stop}) is outside [0, {self.length})")
        values = np.empty(stop - start, dtype=self.dtype)
        if stop == start:
            return values
        for chunk in range(start // self.chunk_len, (stop - 1) // self.chunk_len + 1):
            low = chunk * self.chunk_len
            first, last = max(start, low), min(stop, low + self.chunk_len)
            if first == low and last == low + self.chunk_len:  # the whole chunk is wanted: decoded in place
                self._decode(chunk, values[first - start : last - start])
            else:
                decoded = self._decode(chunk, self._scratch_chunk())
                values[first - start : last - start] = decoded[first - low : last - low]
        return values

    def _scratch_chunk(self) -> np.ndarray:
        scratch = getattr(self._scratch, "chunk", None)
        if scratch is None:
            scratch = self._scratch.chunk = np.empty(self.chunk_len, dtype=self.dtype)
        return scratch

    def _decode(self, chunk: int, into: np.ndarray) -> np.ndarray:
        """Chunk `chunk` decoded into `into` (chunk_len values), after its checksum is checked."""
        key = self._array.metadata.encode_chunk_key((chunk,))
        try:
            with open(os.path.join(self._directory, *key.split("/")), "rb") as file:
                encoded = file.read()
        except OSError as error:
            raise ChunkReadFailed(f"chunk {key}: {error}") from None
        body = np.frombuffer(encoded, dtype=np.uint8)[:-CHECKSUM_BYTES]  # a view: no copy
        if len(encoded) < CHECKSUM_BYTES or google_crc32c.value(body) != int.from_bytes(
            encoded[-CHECKSUM_BYTES:], "little"
        ):
            raise ChunkReadFailed(f"chunk {key}: checksum mismatch")
        try:
            # Blosc's 16-byte header: version, version, flags, typesize, then uncompressed and compressed sizes
            if int.from_bytes(encoded[4:8], "little") != self._chunk_bytes:
                raise ChunkReadFailed(f"chunk {key}: does not decode to one chunk")
            blosc.decompress(body, into)
        except (RuntimeError, ValueError, TypeError) as error:
            raise ChunkReadFailed(f"chunk {key}: {error}") from None
        return into


def chunk_file_reader(array: zarr.Array) -> ChunkFileReader | None:
    """A ChunkFileReader for `array` when it is one our fast path reads (see the module docstring), else None."""
    store = array.store
    while isinstance(store, WrapperStore):  # e.g. the view in which absent chunks are errors (store.py)
        store = store._store
    metadata = array.metadata
    if not isinstance(store, LocalStore) or metadata.zarr_format != 3 or array.ndim != 1:
        return None
    if metadata.storage_transformers or not isinstance(metadata.chunk_grid, RegularChunkGrid):
        return None
    codecs = metadata.codecs
    if [type(codec) for codec in codecs] != [BytesCodec, BloscCodec, Crc32cCodec]:
        return None
    little_endian = codecs[0].endian is None or codecs[0].endian.value == "little"
    if not (little_endian and sys.byteorder == "little" and array.dtype.byteorder in "=<|"):
        return None
    return ChunkFileReader(array, os.path.join(str(store.root), *array.path.split("/")))
