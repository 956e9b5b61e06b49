"""What travels between a site and the coordinator: the adapter as a Flower ArrayRecord."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from common.adapter import AdapterState, WireDtype, from_wire, to_wire


def to_record(state: Mapping[str, torch.Tensor], dtype: WireDtype = "fp32") -> ArrayRecord:
    """The adapter as an ArrayRecord, keyed by PEFT names, in fp32 or fp16."""
    return numpy_record(to_wire(state, dtype))


def numpy_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """NumPy arrays as an ArrayRecord, in their order."""
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(a)) for k, a in arrays.items()})


def from_record(record: ArrayRecord) -> AdapterState:
    """The adapter from an ArrayRecord, as fp32 tensors."""
    return from_wire({k: record[k].numpy() for k in record})
