"""``python -m loralab`` (and ``torchrun -m loralab``) runs the command line."""

from .cli import main

raise SystemExit(main())
