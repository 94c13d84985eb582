"""Baseline servers for scripts/bench_serve.py: the designs actdata is measured against.

    python scripts/baseline_servers.py litapi PORT ROWS DIM   # LitServe's LitAPI path (POST /predict)
    python scripts/baseline_servers.py torchsave PORT ROWS DIM  # a plain route serialising with torch.save

Both answer with a float32 tensor [ROWS, DIM] of fixed random values, so only the transport differs.
"""
import io
import sys

import litserve as ls
import torch
from fastapi.responses import Response


class RowsAPI(ls.LitAPI):
    """Returns the same tensor bytes as actdata would, through LitServe's worker queues."""

    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.rows, self.dim = rows, dim

    def setup(self, device):
        self.t = torch.randn(self.rows, self.dim)

    def decode_request(self, request):
        return request

    def predict(self, x):
        return self.t.numpy().tobytes()

    def encode_response(self, output):
        return Response(content=output, media_type="application/octet-stream")


def litapi(port: int, rows: int, dim: int) -> None:
    ls.LitServer(RowsAPI(rows, dim), accelerator="cpu", devices=1).run(
        port=port, generate_client_file=False, num_api_servers=1, log_level="warning")


def torchsave(port: int, rows: int, dim: int) -> None:
    import uvicorn
    from fastapi import FastAPI
    app, t = FastAPI(), torch.randn(rows, dim)

    @app.get("/tensor")
    def tensor():
        buf = io.BytesIO()
        torch.save(t, buf)
        return Response(content=buf.getvalue(), media_type="application/octet-stream")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    kind, port, rows, dim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    {"litapi": litapi, "torchsave": torchsave}[kind](port, rows, dim)
