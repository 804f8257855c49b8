"""What the running kernel offers, for tests that force one attach mode.

uprobe session links came with Linux 6.13, uprobe_multi links with 6.6; perf-event
uprobes work everywhere. A mode the kernel lacks is not generated as a test case at
all (it is not a skip: nothing could run it here), so a hosted CI runner with an
older kernel runs the modes it has, and this machine (6.18) runs all three."""

from __future__ import annotations

import os
import re

MODE_SINCE = {"session": (6, 13), "multi": (6, 6), "perf": (0, 0)}


def kernel_version(release: str | None = None) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", release or os.uname().release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def attach_modes(release: str | None = None) -> list[str]:
    """The attach modes this kernel offers, best first."""
    v = kernel_version(release)
    return [mode for mode, since in MODE_SINCE.items() if v >= since]
