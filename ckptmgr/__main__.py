"""``python -m ckptmgr``: the same as the ``ckptmgr`` command."""

import sys

from ckptmgr.cli import main

sys.exit(main())
