"""Per-item checksums checked the first time each item is read, the verification of the image and latent caches.

Why per item and on first read: hashing a whole cache at every start costs a pass over every byte on every process
(seconds per 100,000 images, growing with the data), while a batch reads a few items; checking each item as it is
first read costs only the bytes the run reads anyway, once, and a damaged item is still found before it is used.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

#: Bytes of one item's blake2b digest: 2**-64 chance that damage goes unnoticed.
DIGEST_SIZE = 8


def item_digest(*buffers: np.ndarray | bytes) -> bytes:
    """The blake2b digest of one item's bytes (several buffers are hashed as one, in order)."""
    digest = hashlib.blake2b(digest_size=DIGEST_SIZE)
    for buffer in buffers:
        if isinstance(buffer, np.ndarray):
            buffer = np.ascontiguousarray(buffer).reshape(-1).view(np.uint8).data
        digest.update(buffer)
    return digest.digest()


def digests_array(hex_digests: Iterable[str]) -> np.ndarray:
    """Hex digests (as chunk records store them) as a uint8 ``[N, DIGEST_SIZE]`` array."""
    rows = [bytes.fromhex(text) for text in hex_digests]
    return np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(len(rows), DIGEST_SIZE).copy()


def file_checksum(path: str, chunk: int = 1 << 24) -> str:
    """blake2b of a whole file, read in 16 MiB pieces (for a cache's small index files)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class FirstReadCheck:
    """The expected digest of each of ``N`` items and which ones this process has already checked."""

    def __init__(self, digests: np.ndarray):
        if digests.ndim != 2 or digests.shape[1] != DIGEST_SIZE:
            raise ValueError(f"digests must be [N, {DIGEST_SIZE}] uint8, got {digests.shape}")
        self.digests = digests
        self.checked = np.zeros(len(digests), dtype=bool)

    def __len__(self) -> int:
        return len(self.digests)

    def matches(self, item: int, *buffers: np.ndarray | bytes) -> bool:
        """Whether item ``item``'s bytes match its digest; a match is remembered, so it is hashed only once."""
        if self.checked[item]:
            return True
        if item_digest(*buffers) != self.digests[item].tobytes():
            return False
        self.checked[item] = True
        return True
