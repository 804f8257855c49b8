"""Leak kinds like valgrind memcheck's: classify the blocks a process still
holds as definitely lost, indirectly lost, possibly lost or still reachable.

* :mod:`.classify` -- the classification itself, pure (numpy), no I/O;
* :mod:`.memory` -- reading a stopped process: maps, memory;
* :mod:`.ptrace` -- its threads' registers (the standard library only);
* :mod:`.heap` -- glibc's malloc structures (arenas, chunks, tcache, mmapped
  chunks) seen from outside;
* :mod:`.allocmem` -- each supported allocator's own memory (glibc, jemalloc,
  tcmalloc, mimalloc, musl), never a root;
* :mod:`.roots` -- the root set as memcheck takes it, and
  :func:`~.roots.scan_process`, the whole scan of a stopped process.
"""

from .classify import (DEFAULT_HEURISTICS, DEFINITE, HEURISTICS, INDIRECT, KIND_NAMES, POSSIBLE, REACHABLE,
                       Classification, classify)

__all__ = ["classify", "Classification", "KIND_NAMES", "HEURISTICS", "DEFAULT_HEURISTICS",
           "DEFINITE", "INDIRECT", "POSSIBLE", "REACHABLE"]
