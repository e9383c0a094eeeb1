"""`python -m trainer.tracking sync RUN_DIR --to NAME`: see `trainer.tracking.sync`."""

import sys

from trainer.tracking.sync import main

sys.exit(main())
