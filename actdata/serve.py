"""`python -m actdata.serve +preset=NAME key=value ...`: the server's command line (see actdata.serving)."""
from .serving.main import main, serve  # noqa: F401
from .serving.process import ServerProcess  # noqa: F401

if __name__ == "__main__":
    main()
