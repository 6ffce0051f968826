"""The bytes the local server's fake models produce: real PNGs and large deterministic files.

Large files are never held in memory: their bytes are a pure function of (seed, offset), so any
range can be generated on demand and their sha256 computed by streaming.
"""

from __future__ import annotations

import functools
import hashlib
import struct
import zlib
from collections.abc import Iterator

BLOCK_SIZE = 1024 * 1024


def png_from_prompt(prompt: str, width: int = 64, height: int = 64) -> bytes:
    """A real RGB PNG whose pixels derive from ``prompt`` (the same prompt gives the same image)."""
    seed = hashlib.sha256(prompt.encode()).digest()
    r0, g0, b0, dr, dg, db = seed[:6]
    rows = bytearray()
    for y in range(height):
        rows.append(0)  # filter type: none
        for x in range(width):
            rows += bytes(
                ((r0 + x * dr // 16) % 256, (g0 + y * dg // 16) % 256, (b0 + (x + y) * db // 32) % 256)
            )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(rows), 6))
        + chunk(b"IEND", b"")
    )


@functools.lru_cache(maxsize=8)
def _base_block(seed: str) -> bytes:
    return hashlib.shake_256(seed.encode()).digest(BLOCK_SIZE)


def _block(seed: str, index: int) -> bytes:
    base = _base_block(seed)
    shift = (index * 7919) % BLOCK_SIZE
    return base[shift:] + base[:shift]


def generated_bytes(seed: str, size: int, start: int = 0, chunk_size: int = 256 * 1024) -> Iterator[bytes]:
    """Yield bytes ``start..size`` of the deterministic file ``(seed, size)`` in chunks."""
    offset = start
    while offset < size:
        index, within = divmod(offset, BLOCK_SIZE)
        block = _block(seed, index)
        end = min(BLOCK_SIZE, within + chunk_size, within + size - offset)
        yield block[within:end]
        offset += end - within


def sha256_of(chunks: Iterator[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


def sniff_content_type(head: bytes, declared: str) -> str:
    """The content type from magic bytes, as the real API does; the declared one when unknown."""
    for magic, content_type in _MAGIC:
        if head.startswith(magic):
            return content_type
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return declared or "application/octet-stream"
