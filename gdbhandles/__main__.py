"""`python -m gdbhandles` works like the `gdbhandles` command."""

import sys

from gdbhandles.cli import main

sys.exit(main())
