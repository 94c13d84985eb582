"""The wire protocol, defined once: a tensor <-> raw bytes + headers. Imported by server and clients.

A tensor response body is the C-contiguous little-endian bytes of a tensor [N, *sample_shape];
`X-Tensor-Shape: N,d1,d2` and `X-Tensor-Dtype: float32|float16|bfloat16` describe it, and
`Content-Encoding: identity` keeps middlewares from compressing it. bfloat16 travels as its raw
2-byte words. Encoding hands out a view of the tensor's memory (no copy); decoding reads the body
straight into the tensor that is returned (one copy: socket -> tensor).
"""
from __future__ import annotations

import math
import sys
from typing import Callable, Mapping, NamedTuple

import numpy as np
import torch

SHAPE = "X-Tensor-Shape"
DTYPE = "X-Tensor-Dtype"
PROCESS = "X-Actdata-Process"  # "i/n": HTTP process i of n answered (clients spread their connections by it)
TENSOR_PATH = "/activations/tensor"
JSON_PATH = "/activations"
DIRECTORY_KIND = "actdata-directory"  # GET / of a cluster's directory carries "kind": DIRECTORY_KIND
SERVERS_PATH = "/servers"  # a directory's list of live servers
MEDIA_TYPE = "application/octet-stream"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# numpy arrays over the same bytes; numpy has no bfloat16, so bf16 rows are viewed as their raw 2-byte words
NUMPY = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16,
         torch.int64: np.int64, torch.int32: np.int32, torch.int16: np.int16, torch.int8: np.int8,
         torch.uint8: np.uint8, torch.bool: np.bool_}

assert sys.byteorder == "little", "the wire format is little-endian; big-endian hosts are not supported"


class WireError(ValueError):
    """Headers or body that do not describe a tensor."""


def row_bytes(sample_shape: tuple, dtype: str) -> int:
    """Bytes of one row of `sample_shape` in the named dtype (a DTYPES key)."""
    return math.prod(sample_shape) * DTYPES[dtype].itemsize


def headers_for(shape: tuple, dtype: torch.dtype) -> dict[str, str]:
    if dtype not in DTYPE_NAMES:
        raise WireError(f"dtype {dtype} has no wire name (use one of {', '.join(DTYPES)})")
    return {SHAPE: ",".join(str(int(s)) for s in shape), DTYPE: DTYPE_NAMES[dtype],
            "Content-Encoding": "identity"}


def encode(t: torch.Tensor) -> tuple[memoryview, dict[str, str]]:
    """(body, headers) for a contiguous CPU tensor; the body is a view of the tensor's memory."""
    if not t.is_contiguous():
        t = t.contiguous()
    body = t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else memoryview(b"")
    return body, headers_for(tuple(t.shape), t.dtype)


def parse(headers: Mapping[str, str]) -> tuple[tuple[int, ...], torch.dtype, int]:
    """(shape, dtype, nbytes) from response headers (case-insensitive mapping or http.client message)."""
    shape_s, dtype_s = headers.get(SHAPE), headers.get(DTYPE)
    if shape_s is None or dtype_s is None:
        raise WireError(f"response lacks {SHAPE} / {DTYPE} headers")
    try:
        shape = tuple(int(x) for x in shape_s.split(",")) if shape_s else ()
    except ValueError:
        raise WireError(f"bad {SHAPE}: {shape_s!r}") from None
    if any(s < 0 for s in shape):
        raise WireError(f"bad {SHAPE}: {shape_s!r}")
    if dtype_s not in DTYPES:
        raise WireError(f"unknown {DTYPE}: {dtype_s!r}")
    dtype = DTYPES[dtype_s]
    return shape, dtype, math.prod(shape) * dtype.itemsize


def empty_for(headers: Mapping[str, str], empty: Callable[..., torch.Tensor] = torch.empty
              ) -> tuple[torch.Tensor, memoryview]:
    """A tensor to receive the body described by `headers` (made by `empty(shape, dtype=...)`, e.g. an
    allocator of pinned or shared memory), and a writable byte view of it."""
    shape, dtype, nbytes = parse(headers)
    t = empty(shape, dtype=dtype)
    view = t.reshape(-1).view(torch.uint8).numpy().data if nbytes else memoryview(bytearray())
    return t, view


def decode(body: bytes | bytearray | memoryview, headers: Mapping[str, str]) -> torch.Tensor:
    """A tensor from a complete body (shares memory with a writable body; copies a read-only one)."""
    shape, dtype, nbytes = parse(headers)
    if len(body) != nbytes:
        raise WireError(f"body has {len(body)} bytes, headers say {nbytes}")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    if isinstance(body, bytes):
        body = bytearray(body)
    return torch.frombuffer(body, dtype=torch.uint8).view(dtype).reshape(shape)


# -- several tensors in one body: safetensors ------------------------------------------------------------
# A response that carries more than one tensor (rows + provenance, statistics) is a safetensors file:
#   8 bytes   little-endian uint64 N = header length
#   N bytes   JSON {name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}},
#             padded with spaces so that the data starts 8-byte aligned
#   data      the tensors' raw little-endian bytes, back to back, offsets relative to the data start
# Any client reads it with `safetensors.torch.load(body)`; `decode_tensors` reads it without a copy.
# `tensors_layout` lays tensors out in the order given: put 8-byte types first so that every tensor
# starts aligned to its item size (the server writes rows straight into their place in the body).

PROVENANCE_QUERY = "provenance"  # GET /activations/tensor?num_samples=N&provenance=1
TENSORS_FORMAT = "X-Tensor-Format"  # "safetensors" on a multi-tensor body
SAFETENSORS_MEDIA_TYPE = "application/vnd.safetensors"
ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
ST_TORCH = {v: k for k, v in ST_DTYPES.items()}
# The provenance arrays, in body order (before "activations", which comes last): name -> dtype.
PROVENANCE = {"doc_ids": torch.int64, "token_ids": torch.int32, "positions": torch.int32}
PROVENANCE_BYTES = sum(t.itemsize for t in PROVENANCE.values())  # per row


def tensors_layout(specs: list[tuple[str, torch.dtype, tuple]], metadata: Mapping[str, str] | None = None
                   ) -> tuple[bytes, dict[str, tuple[int, int]], int]:
    """(prefix = length + padded JSON header, {name: (begin, end) byte offsets in the whole body}, total
    body bytes) for tensors (name, dtype, shape) laid out in the given order."""
    import json

    header, off, offsets = {}, 0, {}
    for name, dtype, shape in specs:
        if dtype not in ST_DTYPES:
            raise WireError(f"dtype {dtype} has no safetensors name")
        n = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": [int(s) for s in shape], "data_offsets": [off, off + n]}
        offsets[name] = (off, off + n)
        off += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    prefix = len(text).to_bytes(8, "little") + text
    start = len(prefix)
    return prefix, {k: (start + a, start + b) for k, (a, b) in offsets.items()}, start + off


def tensor_views(body: torch.Tensor, specs: list[tuple[str, torch.dtype, tuple]],
                 offsets: Mapping[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Tensors that are views into a uint8 body tensor at the layout's offsets (to fill in place)."""
    return {name: body[offsets[name][0]:offsets[name][1]].view(dtype).view(*shape) for name, dtype, shape in specs}


def encode_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """A safetensors body holding `tensors` (CPU), in the order given (see tensors_layout)."""
    specs = [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    prefix, offsets, total = tensors_layout(specs, metadata)
    body = torch.empty(total, dtype=torch.uint8)
    body[:len(prefix)] = torch.frombuffer(bytearray(prefix), dtype=torch.uint8)
    for (name, _, _), view in zip(specs, tensor_views(body, specs, offsets).values()):
        view.copy_(tensors[name])
    return body.numpy().tobytes()


class TensorEntry(NamedTuple):
    """One tensor of a safetensors header: dtype, shape and byte range after the header."""

    dtype: torch.dtype
    shape: tuple
    begin: int
    end: int


def _ints(x) -> bool:
    """x is a list of non-negative integers (not booleans)."""
    return isinstance(x, list) and all(type(v) is int and v >= 0 for v in x)


def parse_header(text: bytes) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """({name: TensorEntry}, metadata) from the JSON of a safetensors header; WireError saying what is
    wrong with a malformed one (a response body and a store shard are read through this alike)."""
    import json

    try:
        header = json.loads(text)
    except ValueError as e:  # UnicodeDecodeError included
        raise WireError(f"the safetensors header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise WireError(f"the safetensors header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise WireError("the safetensors header's __metadata__ is not an object")
    out = {}
    for name, h in header.items():
        if not (isinstance(h, dict) and h.get("dtype") in ST_TORCH and _ints(h.get("shape"))
                and _ints(h.get("data_offsets")) and len(h["data_offsets"]) == 2):
            raise WireError(f"the safetensors header's entry {name!r} is not a tensor entry")
        dtype, shape, (a, b) = ST_TORCH[h["dtype"]], tuple(h["shape"]), h["data_offsets"]
        if b - a != math.prod(shape) * dtype.itemsize:
            raise WireError(f"the safetensors header's entry {name!r}: offsets {[a, b]} do not fit its shape "
                            f"{list(shape)}")
        out[name] = TensorEntry(dtype, shape, a, b)
    return out, metadata


def decode_tensors(body: bytes | bytearray | memoryview) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """({name: tensor}, metadata) from a safetensors body; tensors share memory with a writable body."""
    if len(body) < 8:
        raise WireError("safetensors body shorter than its 8-byte header length")
    n = int.from_bytes(bytes(body[:8]), "little")
    if 8 + n > len(body):
        raise WireError(f"safetensors header of {n} bytes exceeds the body ({len(body)} bytes)")
    entries, metadata = parse_header(bytes(body[8:8 + n]))
    if isinstance(body, bytes):
        body = bytearray(body)
    raw = torch.frombuffer(body, dtype=torch.uint8) if len(body) else torch.empty(0, dtype=torch.uint8)
    out = {}
    for name, (dtype, shape, a, b) in entries.items():
        a, b = 8 + n + a, 8 + n + b
        if b > len(body):
            raise WireError(f"tensor {name!r}: its bytes end past the body ({b} > {len(body)})")
        part = raw[a:b]
        if a % dtype.itemsize:  # not aligned for a view: copy
            part = part.clone()
        out[name] = part.view(dtype).view(*shape) if b > a else torch.empty(shape, dtype=dtype)
    return out, metadata
