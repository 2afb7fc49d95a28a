"""What the tests read of a process's own memory."""

from __future__ import annotations

import re
from pathlib import Path


def anonymous_resident_bytes() -> int:
    """Bytes of this process's memory that no file backs, in memory (RssAnon)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"^RssAnon:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024
