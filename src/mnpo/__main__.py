"""``python -m mnpo`` (and ``torchrun -m mnpo``): the command line."""

import sys

from mnpo.cli import main

sys.exit(main())
