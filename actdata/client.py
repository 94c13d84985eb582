"""`python -m actdata.client [URL]`, and the import path of the original service's client."""
from .reading.client import ActivationClient, ActivationServerError, ServerUnavailable, main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
