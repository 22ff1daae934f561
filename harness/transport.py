"""How client work travels between processes: one pickle (bytes) per message, tensors as numpy arrays.

Pickling a torch tensor the default way runs torch.save on its storage and unpickling it torch.load:
for a FedAvg result of the MNIST CNN (8 tensors) that is ~3500 Python calls, more CPU than a local
step. A CPU tensor that owns its whole storage travels instead as the numpy array over the same
memory (its bytes, dtype and shape), copied on arrival into a tensor of torch's own allocation
(aligned as torch aligns, as the default way gives), so the values, dtypes, shapes and strides
arrive unchanged. Other tensors (on a GPU, requiring grad,
views into a larger storage, dtypes numpy lacks, subclasses such as nn.Parameter) travel the
default way. Two distinct tensors over one storage arrive as two tensors with storages of their own.
Everything else is pickled as Ray pickles it (cloudpickle: functions and classes that cannot be
imported travel by value).
"""
from __future__ import annotations

import functools
import io
import pickle
from collections import ChainMap
from typing import Any

import torch

_NUMPY_DTYPES = {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                 torch.float32, torch.float64, torch.complex64, torch.complex128}


def _tensor(array) -> torch.Tensor:
    return torch.from_numpy(array).clone()


def _reduce_tensor(t: torch.Tensor):
    if (t.device.type == "cpu" and t.layout == torch.strided and t.dtype in _NUMPY_DTYPES and not t.requires_grad
            and t.storage_offset() == 0 and t.is_contiguous() and not t.is_conj() and not t.is_neg()
            and t.untyped_storage().nbytes() == t.numel() * t.element_size()):
        return _tensor, (t.numpy(),)
    return t.__reduce_ex__(pickle.HIGHEST_PROTOCOL)


@functools.cache
def _pickler() -> type:
    from ray.cloudpickle import CloudPickler

    class Pickler(CloudPickler):
        # by exact type: subclasses such as nn.Parameter go the default way
        dispatch_table = ChainMap({torch.Tensor: _reduce_tensor}, CloudPickler.dispatch_table)

    return Pickler


def pack(value: Any) -> bytes:
    """`value` as one pickle, its CPU tensors as numpy arrays."""
    out = io.BytesIO()
    _pickler()(out, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    return out.getvalue()


def unpack(data: bytes) -> Any:
    return pickle.loads(data)
