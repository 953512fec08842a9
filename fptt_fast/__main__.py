"""`python -m fptt_fast ...`: the same as the `fptt-fast` console script."""
import sys

from .cli import main

sys.exit(main())
