"""``python -m resta_fast``: hands over to the CLI."""

import sys

from resta_fast.cli import main

sys.exit(main())
