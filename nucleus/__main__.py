"""`python -m nucleus`: the `nucleus` command."""

import sys

from nucleus.cli import main

if __name__ == "__main__":
    sys.exit(main())
