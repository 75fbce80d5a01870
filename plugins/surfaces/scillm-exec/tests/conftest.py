"""Make the shared helpers importable (the suite runs with --import-mode=importlib) and share the server fixture."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from scillm_exec_helpers import server  # noqa: F401
