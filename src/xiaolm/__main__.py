"""``python -m xiaolm`` (and ``torchrun -m xiaolm pretrain ...``) runs the CLI."""
import sys

from xiaolm.cli import main

sys.exit(main())
