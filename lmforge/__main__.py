"""`python -m lmforge ...` (and `torchrun ... -m lmforge ...`): the same CLI as the `lmforge` script."""

from lmforge.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
