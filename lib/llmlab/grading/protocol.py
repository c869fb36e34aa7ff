"""The wire between the trusted grader and a sandboxed student process.

Messages are length-prefixed JSON headers, optionally followed by one safetensors blob.
Values cross as plain data only — None, bools, numbers, strings, lists, tuples, dicts with
string keys, tensors and numpy arrays — and are rebuilt on the other side from that data.
Nothing is unpickled and no student object ever reaches the trusted process, so a student
cannot smuggle in an object whose `__eq__` lies or whose methods run code on the grader.
"""
from __future__ import annotations

import json
import math
import struct
from typing import Any, BinaryIO

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

MAX_HEADER = 4 << 20  # bytes of JSON in one message
MAX_BLOB = 512 << 20  # bytes of tensors in one message
MAX_DEPTH = 32


class ProtocolError(RuntimeError):
    """A message was malformed, too large, or held a value the grader does not accept."""


def encode(value: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Turn `value` into JSON-able data plus the tensors it references by key."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(v: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise ProtocolError("value nested too deeply")
        if v is None or isinstance(v, bool):  # subclasses of the plain types cross as their base type
            return None if v is None else bool(v)
        if isinstance(v, str):
            return str(v)
        if isinstance(v, int):
            return {"int": str(int(v))} if abs(v) > 2**53 else int(v)
        if isinstance(v, float):
            return float(v) if math.isfinite(v) else {"float": repr(float(v))}
        if isinstance(v, np.generic):
            return enc(v.item(), depth)
        if isinstance(v, np.ndarray):
            if v.dtype == object:
                raise ProtocolError("numpy arrays of Python objects cannot be graded")
            v = torch.from_numpy(np.ascontiguousarray(v))
        if isinstance(v, torch.Tensor):
            key = f"t{len(tensors)}"
            plain = torch.Tensor.as_subclass(v.detach(), torch.Tensor)  # drop any subclass
            tensors[key] = plain.to("cpu").contiguous().clone()
            return {"tensor": key, "grad": True} if v.requires_grad else {"tensor": key}
        if isinstance(v, (list, tuple)):  # namedtuples, torch.Size, torch.return_types: as tuples
            tag = "tuple" if isinstance(v, tuple) else "list"
            return {tag: [enc(x, depth + 1) for x in (tuple(v) if tag == "tuple" else list(v))]}
        if isinstance(v, dict):  # defaultdict, OrderedDict: as dicts
            items = list(dict(v).items())
            if not all(isinstance(k, str) for k, _ in items):
                raise ProtocolError("dict keys must be strings")
            return {"dict": [[str(k), enc(x, depth + 1)] for k, x in items]}
        raise ProtocolError(f"a value of type {type(v).__name__} cannot be graded "
                            "(return tensors, numbers, strings or lists/tuples/dicts of them)")

    return enc(value, 0), tensors


def arrays_in(value: Any) -> list:
    """The tensors and numpy arrays inside `value`, in the order `encode` numbers them."""
    found: list = []

    def walk(v: Any) -> None:
        if isinstance(v, (torch.Tensor, np.ndarray)) and not (isinstance(v, np.ndarray) and v.dtype == object):
            found.append(v)
        elif isinstance(v, (list, tuple)) and not isinstance(v, str):
            for x in v:
                walk(x)
        elif isinstance(v, dict):
            for x in dict(v).values():
                walk(x)

    walk(value)
    return found


def decode(data: Any, tensors: dict[str, torch.Tensor], grads: bool = False) -> Any:
    """Rebuild a value from `encode`'s output; only plain Python and torch types come back.

    With `grads`, tensors that required grad on the sending side require it again (arguments
    reaching a student's function, as in the notebook); results always arrive as plain data.
    """

    def dec(d: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise ProtocolError("value nested too deeply")
        if d is None or type(d) in (bool, int, float, str):
            return d
        if type(d) is dict and set(d) == {"tensor", "grad"} and d["grad"] is True and d["tensor"] in tensors:
            t = tensors[d["tensor"]]
            return t.requires_grad_() if grads and (t.is_floating_point() or t.is_complex()) else t
        if type(d) is dict and len(d) == 1:
            (tag, x), = d.items()
            if tag == "tensor" and type(x) is str and x in tensors:
                return tensors[x]
            if tag == "int" and type(x) is str:
                return int(x)
            if tag == "float" and x in ("nan", "inf", "-inf"):
                return float(x)
            if tag in ("list", "tuple") and type(x) is list:
                items = [dec(i, depth + 1) for i in x]
                return items if tag == "list" else tuple(items)
            if tag == "dict" and type(x) is list:
                return {str(k): dec(i, depth + 1) for k, i in x}
        raise ProtocolError(f"malformed value in message: {str(d)[:80]}")

    return dec(data, 0)


def message(header: dict, value: Any = None) -> bytes:
    """One message as bytes: `header` plus (optionally) an encoded `value`."""
    blob = b""
    if value is not None or "value" in header:
        data, tensors = encode(value)
        header = {**header, "value": data}
        blob = st_save(tensors) if tensors else b""
    raw = json.dumps(header, allow_nan=False).encode()
    return struct.pack("<II", len(raw), len(blob)) + raw + blob


def send(stream: BinaryIO, header: dict, value: Any = None) -> None:
    """Write one message to a blocking stream."""
    stream.write(message(header, value))
    stream.flush()


def parse(raw: bytes, blob: bytes, grads: bool = False) -> tuple[dict, Any]:
    """Decode one message body; return (header, value or None)."""
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise ProtocolError(f"bad message header: {e}") from None
    if type(header) is not dict:
        raise ProtocolError("message header is not an object")
    tensors = {k: t.clone() for k, t in st_load(blob).items()} if blob else {}  # own, resizable storage
    value = decode(header.pop("value"), tensors, grads) if "value" in header else None
    return header, value


def frame_sizes(prefix: bytes, limit: int = MAX_BLOB) -> tuple[int, int]:
    """Read the 8-byte prefix; return (header bytes, blob bytes), refusing frames over `limit` bytes."""
    n_raw, n_blob = struct.unpack("<II", prefix)
    if n_raw > MAX_HEADER or n_blob > MAX_BLOB or n_raw + n_blob > limit:
        raise ProtocolError(f"reply too large ({n_raw + n_blob:,} bytes; the limit is {limit:,})")
    return n_raw, n_blob


def recv(stream: BinaryIO, grads: bool = False) -> tuple[dict, Any]:
    """Read one message written by `send` from a blocking stream."""
    prefix = stream.read(8)
    if len(prefix) < 8:
        raise EOFError("stream closed")
    n_raw, n_blob = frame_sizes(prefix)
    raw, blob = stream.read(n_raw), stream.read(n_blob)
    if len(raw) < n_raw or len(blob) < n_blob:
        raise EOFError("stream closed mid-message")
    return parse(raw, blob, grads)
