"""`fedbench data leaf2npz DIR OUT.npz`: LEAF's JSON output (FEMNIST, CelebA-style image arrays) as
the npz file fedbench reads, with each sample's client id for `data.split: {kind: natural}`.

LEAF (github.com/TalwalkarLab/leaf) writes DIR/train/*.json and DIR/test/*.json, each a mapping with
`users` (names), `num_samples` (per user) and `user_data` ({user: {"x": [sample, ...], "y": [label,
...]}}), a sample being a flat list of pixel values. The npz holds x_train/x_test as uint8 images
(values in [0, 1] are scaled by 255, others must lie in 0..255), y_train/y_test, client_train /
client_test (the client id of each sample: users numbered in the order the training files list them)
and `users` (the names, by id). A user of the test files must have training data: LEAF's per-sample
split (`-t sample`) gives that; its per-user split (`-t user`) is not a per-client partition.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from harness.errors import UserError


def _read(folder: Path, part: str) -> list[tuple[str, list, list]]:
    files = sorted((folder / part).glob("*.json"))
    if not files:
        raise UserError(str(folder / part), "holds no LEAF .json file (expected DIR/train/*.json and DIR/test/*.json)")
    users = []
    for f in files:
        try:
            doc = json.loads(f.read_text())
            for name in doc["users"]:
                data = doc["user_data"][name]
                if len(data["x"]) != len(data["y"]):
                    raise UserError(str(f), f"user {name!r} has {len(data['x'])} samples x but {len(data['y'])} labels y")
                users.append((str(name), data["x"], data["y"]))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(str(f), f"not a readable JSON file: {e}") from None
        except (KeyError, TypeError) as e:
            raise UserError(str(f), f"not LEAF's format (users, num_samples, user_data with x and y): missing {e}") from None
    return users


def _shape(features: int, shape: str | None, where: str) -> tuple[int, ...]:
    if shape:
        try:
            dims = tuple(int(d) for d in shape.lower().split("x"))
        except ValueError:
            raise UserError("--shape", f"expected HxW or HxWxC, got {shape!r}") from None
        if math.prod(dims) != features:
            raise UserError("--shape", f"{shape} holds {math.prod(dims)} values, the samples have {features}")
        return dims
    for channels in (1, 3):
        side = math.isqrt(features // channels)
        if side * side * channels == features:
            return (side, side) if channels == 1 else (side, side, 3)
    raise UserError(where, f"samples of {features} values are not square images; give --shape HxW or HxWxC")


def _images(samples: list, dims: tuple[int, ...], where: str) -> np.ndarray:
    x = np.asarray(samples, dtype=np.float64).reshape(len(samples), -1)
    if x.shape[1] != math.prod(dims):
        raise UserError(where, f"samples have {x.shape[1]} values, expected {math.prod(dims)}")
    if len(x) and x.min() >= 0 and x.max() <= 1:
        x = x * 255
    if len(x) and (x.min() < 0 or x.max() > 255):
        raise UserError(where, f"pixel values outside [0, 1] and 0..255 (from {x.min():g} to {x.max():g})")
    return np.rint(x).astype(np.uint8).reshape(len(samples), *dims)


def leaf_to_npz(folder: str | Path, out: str | Path, shape: str | None = None) -> dict[str, int]:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(str(folder), "is not a folder")
    train, test = _read(folder, "train"), _read(folder, "test")
    ids: dict[str, int] = {}
    for name, _, _ in train:
        ids.setdefault(name, len(ids))
    strangers = sorted({name for name, _, _ in test} - set(ids))
    if strangers:
        more = f" (and {len(strangers) - 1} more)" if len(strangers) > 1 else ""
        raise UserError(str(folder / "test"), f"user {strangers[0]!r}{more} has test but no training data: a per-user "
                                              f"split (-t user) is not a per-client one; use LEAF's -t sample")
    first = next((x[0] for _, x, _ in train if x), None)
    if first is None:
        raise UserError(str(folder / "train"), "holds no samples")
    dims = _shape(len(np.ravel(first)), shape, str(folder / "train"))
    arrays = {}
    for part, users in (("train", train), ("test", test)):
        xs = [x for _, x, _ in users]
        arrays[f"x_{part}"] = _images([s for x in xs for s in x], dims, str(folder / part))
        labels = np.asarray([label for _, _, y in users for label in y])
        if labels.size and not np.array_equal(labels, np.round(labels)) or (labels.size and labels.min() < 0):
            raise UserError(str(folder / part), "labels y must be non-negative integers")
        arrays[f"y_{part}"] = labels.astype(np.int64)
        arrays[f"client_{part}"] = np.repeat([ids[n] for n, _, _ in users], [len(x) for x in xs]).astype(np.int64)
    arrays["users"] = np.asarray(list(ids))
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(out)
    return {"users": len(ids), "train": len(arrays["y_train"]), "test": len(arrays["y_test"])}
