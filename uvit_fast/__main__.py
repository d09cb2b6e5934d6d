"""``python -m uvit_fast ...``: the same as the ``uvit-fast`` console script."""
import sys

from uvit_fast.cli import main

sys.exit(main())
