"""The netns tests drive real ``p2pmsg`` processes with the system tests' harness (``tests/system/procs.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "system"))
