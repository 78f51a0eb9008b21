"""R's lazy-load databases (``data/Rdata.rdx`` + ``Rdata.rdb``, what an R package's ``LazyData`` installs),
read without R: ``decompress_lazyload_chunk`` undoes R's per-object compression and PyPI's rdata parses
each object's serialisation (``read_lazyload_db``). The Austen novels and the reviews come this way."""

from __future__ import annotations

import os
import struct
from pathlib import Path


def decompress_lazyload_chunk(chunk: bytes, compression: int) -> bytes:
    """One object of an R lazy-load ``.rdb`` file, decompressed to its R serialisation.

    R writes (``makeLazyLoadDB``; ``R_compress1/2/3`` in R's connections.c) a 4-byte big-endian
    uncompressed length, then: for ``compressed = TRUE`` (1) a zlib stream; for 2 (bzip2) and 3 (xz) a
    type byte, then ``Z`` a raw LZMA2 stream (xz preset 9e, no container; what ``R_compress3`` writes),
    ``2`` bzip2, ``1`` zlib, ``0`` stored bytes (the fallbacks when compressing does not pay), as
    ``R_decompress2/3`` read them. (modeldata's ``LazyDataCompression: xz`` gives 3 and ``Z``.)
    """
    import bz2
    import lzma
    import zlib

    if len(chunk) < 5:
        raise ValueError(f"lazy-load chunk of {len(chunk)} bytes is too short")
    size = struct.unpack(">I", chunk[:4])[0]
    if compression == 1:
        body = zlib.decompress(chunk[4:])
    elif compression in (2, 3):
        kind, data = chr(chunk[4]), chunk[5:]
        if kind == "Z":
            body = lzma.decompress(data, format=lzma.FORMAT_RAW,
                                   filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}])
        elif kind == "2":
            body = bz2.decompress(data)
        elif kind == "1":
            body = zlib.decompress(data)
        elif kind == "0":
            body = data
        else:
            raise ValueError(f"unknown lazy-load chunk type {kind!r}")
    else:
        raise ValueError(f"unknown lazy-load compression {compression!r}")
    if len(body) != size:
        raise ValueError(f"lazy-load chunk: header says {size} bytes, decompressed {len(body)}")
    return body


def read_lazyload_db(directory: str | os.PathLike, stem: str = "Rdata", names=None) -> dict:
    """The objects of the R lazy-load database ``directory/stem.rdx`` + ``stem.rdb``, converted by rdata.

    The ``.rdx`` index is a gzipped serialisation of ``list(variables = list(name = c(offset, length)),
    references, compressed)``; each object is the chunk ``rdb[offset:offset + length]``
    (``decompress_lazyload_chunk``), an RDS serialisation rdata parses. ``names``: only these objects.
    """
    try:
        import rdata
    except ImportError:
        raise ImportError("reading R data needs PyPI's rdata: pip install rdata") from None
    import numpy as np

    directory = Path(directory)
    index = rdata.conversion.convert(
        rdata.parser.parse_data((directory / f"{stem}.rdx").read_bytes(), extension=".rds"))
    compression = int(np.asarray(index["compressed"]).ravel()[0])
    raw = (directory / f"{stem}.rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        name = str(name)
        if names is not None and name not in names:
            continue
        body = decompress_lazyload_chunk(raw[int(offset):int(offset) + int(length)], compression)
        out[name] = rdata.conversion.convert(rdata.parser.parse_data(body, extension=".rds"))
    return out
