"""``python -m load_tests.loadgen``."""

import sys

from load_tests.loadgen.cli import main

sys.exit(main())
