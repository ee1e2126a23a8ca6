"""The verl integration's tests: they need verl, which ``bash run.sh test`` installs in its own environment
(constraints-verl.txt: verl pins an older transformers); elsewhere each module skips. The folder is not named
``verl``: with ``tests/`` on ``sys.path`` it would shadow the package."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
