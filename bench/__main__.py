"""``python -m bench``: see bench.cli for the options."""

import sys

from bench import main

raise SystemExit(main(sys.argv[1:]))
