import sys

from .cli import main

# Guarded so that walking the package's modules (an import check) does not run the CLI.
if __name__ == "__main__":
    sys.exit(main())
