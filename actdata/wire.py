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
from typing import Callable, Mapping

import torch

SHAPE = "X-Tensor-Shape"
DTYPE = "X-Tensor-Dtype"
TENSOR_PATH = "/activations/tensor"
JSON_PATH = "/activations"
DIRECTORY_KIND = "actdata-directory"  # GET / of a cluster's directory carries "kind": DIRECTORY_KIND
SERVERS_PATH = "/servers"  # a directory's list of live servers
MEDIA_TYPE = "application/octet-stream"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

assert sys.byteorder == "little", "the wire format is little-endian; big-endian hosts are not supported"


class WireError(ValueError):
    """Headers or body that do not describe a tensor."""


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
