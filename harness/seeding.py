"""Every random stream derives from (seed, purpose, round, client, ...): the same config gives the
same numbers whichever process or backend draws them, and in whatever order."""
from __future__ import annotations

import zlib

import numpy as np
import torch


def _key(part: int | str) -> int:
    return zlib.crc32(part.encode()) if isinstance(part, str) else int(part)


def seed_of(*parts: int | str) -> int:
    """A 63-bit seed for the stream named by `parts`."""
    state = np.random.SeedSequence([_key(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def rng(*parts: int | str) -> np.random.Generator:
    return np.random.default_rng(seed_of(*parts))


def torch_generator(*parts: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(seed_of(*parts))
