"""The watchdog process's descriptor hand-off (tracer/watchdog.py,
Watchdog.release): what pytest sends is closed there, and the watchdog still
ends by itself when pytest closes its pipe. No eBPF: the map fd it polls is
a pipe here (its walks of it fail and find nothing)."""

import os
import select

from pytest_memleak_ebpf.tracer.watchdog import Watchdog


def _eof_within(fd: int, seconds: float) -> bool:
    if not select.select([fd], [], [], seconds)[0]:
        return False
    return os.read(fd, 1) == b""


def test_released_descriptors_are_closed_in_the_watchdog_and_it_ends_by_itself():
    map_r, map_w = os.pipe()
    wd = Watchdog(map_r, 10)
    try:
        pipes = [os.pipe() for _ in range(3)]
        wd.release([w for _, w in pipes])
        for r, w in pipes:
            # ours is closed at once ...
            try:
                os.fstat(w)
                still_open = True
            except OSError:
                still_open = False
            assert not still_open
            # ... and the watchdog's copy too: the read end sees EOF
            assert _eof_within(r, 5.0)
            os.close(r)
    finally:
        wd.close()
        os.close(map_r)
        os.close(map_w)
    # it read EOF and returned (a watchdog that had to be killed reads -9)
    assert wd.proc.returncode == 0
