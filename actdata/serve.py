"""`python -m actdata.serve +preset=NAME key=value ...`: the server's command line (see actdata.serving)."""
from .serving.main import ServerProcess, main, serve  # noqa: F401

if __name__ == "__main__":
    main()
