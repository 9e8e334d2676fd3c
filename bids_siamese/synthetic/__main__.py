"""``python -m bids_siamese.synthetic``: the ``bids-siamese-demo`` command line."""
import sys

from .cli import main

sys.exit(main())
