"""Make the shared helpers importable (the suite runs with --import-mode=importlib)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from opencode_helpers import stack  # noqa: F401
