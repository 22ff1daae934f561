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


def uniform_at(ids, *parts: int | str) -> np.ndarray:
    """`rng(*parts).random(n)[ids]` without drawing the n: the stream's PCG64 is advanced to each id
    (one 64-bit output per double), so one client's draw costs the same among ten or ten million."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    base = np.random.PCG64(seed_of(*parts))
    start, bits = base.state, np.random.PCG64(0)
    gen, out = np.random.Generator(bits), np.empty(len(ids))
    for k, c in enumerate(ids.tolist()):
        bits.state = start
        bits.advance(c)
        out[k] = gen.random()
    return out
