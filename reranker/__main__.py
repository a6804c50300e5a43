import sys

from reranker.cli import main

# Guarded: --devices spawns worker processes, which re-import the main module.
if __name__ == "__main__":
    sys.exit(main())
