"""The tracer, by role (imports go one way, down this list):

- abi: the C/Python contract, read from bpf/memleak.h;
- loading: compile with BCC, the compiled-program cache, load maps and
  programs through libbpf, link kfuncs;
- probes: which functions of which binary, where (placement.py), attached
  how (session / multi / perf);
- collection: the per-test map walks (unit-tested with fake maps);
- core: the Tracer, serving its clients' tests and in-process windows;
- protocol: TracerAPI, what Tracer and server.RemoteTracer both implement;
- server: the xdist controller's tracer served to its workers.
"""

from .collection import RawTest
from .core import Tracer
from .loading import TracerConfig, bpf_source_path
from .probes import ProbeInfo, find_libc

__all__ = ["ProbeInfo", "RawTest", "Tracer", "TracerConfig", "bpf_source_path", "find_libc"]
