"""`python -m actdata.store DIR [--verify]`: inspect a store (see actdata.storage)."""
from .storage.inspect import main

if __name__ == "__main__":
    raise SystemExit(main())
