"""Collection: reading the BPF program's maps into builtin types.

Per test: the test's images' blocks are taken out of their regions of the
live-block table (blocktable.py; images gone at exec are cleared there too),
and one walk of the block hash -- the table's overflow and the roots'
in-process blocks; the whole store with the hash store -- takes out that
test's blocks there (batched lookups and deletes), when one of its images
overflowed or a window closed, and leaves everything else (other clients'
tests, open in-process windows); with the hash store the blocks in a
still-running process's ring are moved to the map first; stacks are looked up, not taken, and collected once the
map is half full (only stacks no remaining block refers to and unused since
the walk began); stacks the kernel gave as plain ips are mapped back to
build-id stacks.

Everything works on map objects with BCC's table interface (Key, Leaf,
map_fd, items(), keys(), [key], del) and a `lib` with BCC's batch calls
(bpf_lookup_batch, bpf_lookup_and_delete_batch, bpf_delete_batch,
bpf_lookup_and_delete): the unit tests give it fakes.
"""

from __future__ import annotations

import ctypes
import errno
import os
import time
from dataclasses import dataclass, field

import numpy as np

from .abi import (BUILD_ID_IP, BUILD_ID_VALID, CTR_LOST_DEAD, CTR_NEW_STACKS, EV_EXEC, PF_EXITED, PF_TERMINATED,
                  SERIAL_CPU_BITS, STACK_STAMP_NS, TF_KINDS, TF_RING, TF_ROOT, Event, fnv_ips)

# _select() verdict: delete the entry (used, or garbage) without yielding anything
DELETE = object()
BATCH_CHUNK = 4096
COUNTERS = ("alloc_bytes", "alloc_blocks", "lost_blocks", "lost_handoffs", "lost_stacks")


@dataclass
class RawTest:
    """Everything the maps held for one test, as builtin types."""

    processes: list[dict] = field(default_factory=list)
    blocks: dict[int, list[tuple[int, int, int]]] = field(default_factory=dict)  # serial -> [(bytes, stack, blocks)]
    stacks: dict[int, list[tuple[int, str | None, int]]] = field(default_factory=dict)  # hash -> frames
    paths: dict[int, list[str]] = field(default_factory=dict)  # serial -> exec/open paths
    lost_procs: int = 0
    lost_events: int = 0
    # in-process (the pytest process's own blocks from its last window)
    inproc_blocks: list[tuple[int, int, int]] = field(default_factory=list)  # (size, stack, ext_ip)
    inproc_counters: dict | None = None
    # the window's blocks per kind when it was classified at its close (kinds/inprocess.py), else None
    inproc_kinds: dict[str, list[tuple[int, int, int]]] | None = None
    inproc_reason: str | None = None                                  # why it was not classified
    # leak kinds: images scanned at exit / at the test's end (exitpause.py)
    kinds: dict[int, dict[str, list[tuple[int, int, int]]]] = field(default_factory=dict)  # serial -> kind -> records
    unclassified: dict[int, str] = field(default_factory=dict)  # serial -> why its blocks have no kind
    scanned: set[int] = field(default_factory=set)              # serials whose blocks have kinds


@dataclass
class Sweep:
    """What one walk of the live-block map found (Collector.sweep_blocks)."""

    blocks: dict = field(default_factory=dict)       # serial -> [(bytes, stack, blocks)]
    kinds: dict = field(default_factory=dict)        # scanned serials: serial -> kind -> [(bytes, stack, blocks)]
    inproc: list = field(default_factory=list)       # the closed window's (size, stack, ext_ip)
    inproc_kinds: dict | None = None                 # the same per kind, when the window was classified
    referenced: set = field(default_factory=set)     # stacks of the blocks left in the map
    frames: dict = field(default_factory=dict)       # stack hash -> frames (looked up)
    started_ns: int = field(default_factory=time.monotonic_ns)
    hash_walked: bool = True                         # the block hash was walked (referenced has its stacks)


@dataclass
class TestRecords:
    """Collector.collect_test(): the test's records, and what the caller
    needs to keep its own state (event paths) in step."""

    processes: dict[int, dict]                   # serial -> process
    blocks: dict
    stacks: dict
    inproc_blocks: list
    live: set[int]                               # images still owned by someone
    t0: int                                      # monotonic ns when the collection began
    kinds: dict = field(default_factory=dict)    # scanned serials: serial -> kind -> records
    inproc_kinds: dict | None = None             # the window's records per kind (classified), else None


def _window_records(sweep: Sweep) -> list:
    """Every record of the sweep's window, classified or not."""
    return sweep.inproc + [r for recs in (sweep.inproc_kinds or {}).values() for r in recs]


def counters_of(v) -> dict:
    """The lifetime and loss counters of a track_t or proc_t value."""
    return {name: int(getattr(v, name)) for name in COUNTERS}


def _view(buf, n: int, names: tuple[str, ...]) -> np.ndarray:
    """The first n entries of a ctypes array of Structures as a numpy array of
    the named (unsigned integer) fields, read in place through a plain byte
    view (numpy's ctypes bridge warns about the format ctypes reports)."""
    st = buf._type_
    dt = np.dtype({"names": list(names),
                   "formats": [f"<u{ctypes.sizeof(dict(st._fields_)[f])}" for f in names],
                   "offsets": [getattr(st, f).offset for f in names], "itemsize": ctypes.sizeof(st)})
    raw = (ctypes.c_ubyte * ctypes.sizeof(buf)).from_buffer(buf)
    return np.frombuffer(raw, dtype=dt, count=n)


def serial_at(t_ns: int) -> int:
    """The smallest image serial the BPF program makes at time t_ns or later."""
    return t_ns << SERIAL_CPU_BITS


def place_ip(ip: int, biases) -> tuple:
    """A plain-ip frame as (VALID, build id, file offset) in the module whose
    known load bias puts it at the smallest offset, else unchanged."""
    best = None
    for bid, bias in biases:
        off = ip - bias
        if 0 <= off < (1 << 31) and (best is None or off < best[2]):
            best = (BUILD_ID_VALID, bid, off)
    return best or (BUILD_ID_IP, None, ip)


def int_of(v) -> int:
    return int(getattr(v, "value", v))


def decode_event(data) -> tuple[int, int, int, str]:
    """A ring-buffer record (a pointer to an event_t): (type, tgid, serial, path)."""
    ev = ctypes.cast(data, ctypes.POINTER(Event)).contents
    return int(ev.type), int(ev.tgid), int(ev.serial), ev.path.decode("utf-8", "surrogateescape")


def absolute_path(tgid: int, path: str, ev_type: int) -> str:
    """A relative exec/open path made absolute (the process's exe or cwd)."""
    if ev_type == EV_EXEC:
        try:
            return os.readlink(f"/proc/{tgid}/exe")
        except OSError:
            pass
    try:
        cwd = os.readlink(f"/proc/{tgid}/cwd")
    except OSError:
        cwd = os.getcwd()
    return os.path.normpath(os.path.join(cwd, path))


def proc_dict(v, running: dict | None) -> dict:
    flags = int(v.flags)
    d = {
        "serial": int(v.serial),
        "pid": int(v.tgid),
        "ppid": int(v.ppid),
        "uid": int(v.uid),
        "comm": bytes(v.comm).split(b"\0", 1)[0].decode("utf-8", "replace"),
        "exe_raw": bytes(v.exe).split(b"\0", 1)[0].decode("utf-8", "surrogateescape") or None,
        "execs": int(v.execs),
        "alloc_id": int(v.alloc_id),
        "exited": bool(flags & PF_EXITED),
        "exit_code": int(v.exit_code) if flags & PF_TERMINATED and int(v.signal) == 0 else None,
        "signal": int(v.signal) if flags & PF_TERMINATED and int(v.signal) else None,
        "start_ns": int(v.start_ns),
        "exit_ns": int(v.exit_ns) or None,
        **counters_of(v),
    }
    if running is not None and not d["exited"]:
        d.update({k: running[k] for k in COUNTERS if k in running})
    d["running_at_test_end"] = not d["exited"]
    return d


def delete(table, key) -> None:
    try:
        del table[key]
    except KeyError:
        pass


class Collector:
    """The map walks of one loaded program. `maps` maps a map's name
    (tracked, procs, blocks, stacks, counters, rawcache, handoffs) to its
    table; `lib` has the batch calls."""

    def __init__(self, maps: dict, lib, *, stack_depth: int, max_stacks: int,
                 thread_alive=lambda tid: os.path.exists(f"/proc/{tid}"), table=None):
        """table: the live-block table (blocktable.BlockTable) when the program
        keeps tracked images' blocks there (`blocks` then holds the roots'
        blocks and the table's overflow), with maps["dead"]: the images gone
        at exec."""
        self.lib = lib
        self.table = table
        self.dead = maps.get("dead")
        self.dead_lost = 0   # CTR_LOST_DEAD when the table was last swept whole
        self.tracked = maps["tracked"]
        self.procs = maps["procs"]
        self.blocks = maps["blocks"]
        self.stacks = maps["stacks"]
        self.counters = maps["counters"]
        self.rawcache = maps["rawcache"]
        self.handoffs = maps["handoffs"]
        self.stack_depth = stack_depth
        self.max_stacks = max_stacks
        self.thread_alive = thread_alive
        self._batch_bufs: dict = {}
        self.stacks_deleted = 0
        self.stack_gc_at = max(16, max_stacks // 2)

    # -- one test ---------------------------------------------------------

    def collect_test(self, test_id: int, *, active: set[int], window_serial: int, window_allocs: bool,
                     windows: set[int], single_client: bool, block_kinds=None,
                     window_kinds: dict | None = None) -> TestRecords:
        """Take out the records of test `test_id`: its processes (those still
        running stop being tracked), their blocks and stacks, and the blocks
        of the closed in-process window `window_serial` (-1: none; walked
        only when window_allocs). `active`: the tests running now (other
        clients'); `windows`: other in-process windows whose blocks stay.
        block_kinds(serials) -> {serial: {address: kind}} of the images that
        were scanned (their blocks are summed per kind and stack).
        window_kinds: {address: kind} of the window's blocks, when it was
        classified at its close (its records then come per kind)."""
        # Records made from now on belong to live processes: serials are
        # monotonic time, so anything older that no live process or active
        # test owns is garbage (a process that outlived its test).
        t0 = time.monotonic_ns()
        running = self.untrack_test(test_id)
        self.sweep_handoffs()
        live = self.tracked_serials()
        procs: dict[int, dict] = {}
        garbage: set[int] = set()
        overflowed = any(v.get("overflowed", 0) for v in running.values())
        for k, v in list(self.procs.items()):
            serial, tid = int_of(k), int(v.test_id)
            if tid == test_id:
                procs[serial] = proc_dict(v, running.get(serial))
                overflowed = overflowed or int(v.overflowed) > 0
                delete(self.procs, k)
            elif tid in active or serial in live:
                live.add(serial)
            else:   # its test is over (forked while a test was being collected)
                garbage.add(serial)
                delete(self.procs, k)
        if self.table is not None:
            self.drop_dead_images(garbage, live, t0)
        # Walking the block map costs ~0.4 ms at 1M entries even when empty:
        # skip it when nothing of this test can be in it.
        if procs or window_allocs:
            sweep = self.sweep_blocks(procs, window_serial, live=live, t0=t0, windows=windows,
                                      single_client=single_client,
                                      kinds=block_kinds(procs.keys()) if block_kinds else None,
                                      window_kinds=window_kinds,
                                      walk_hash=self.table is None or window_allocs or overflowed)
            blocks = self.remap_ip_stacks(sweep, live, t0)
            kinds = {serial: {kind: blocks.pop((serial, kind)) for kind in per} for serial, per in sweep.kinds.items()}
            inproc, inproc_kinds = sweep.inproc, sweep.inproc_kinds
            wanted = {h for bl in blocks.values() for _, h, _ in bl if h} | {h for _, h, _ in _window_records(sweep) if h}
            wanted |= {h for per in kinds.values() for bl in per.values() for _, h, _ in bl if h}
            frames = {**sweep.frames, **self.stack_frames(wanted - sweep.frames.keys())}
            stacks = {h: frames[h] for h in wanted if h in frames}
            self.collect_stack_garbage(sweep)
        else:
            blocks, stacks, inproc, kinds, inproc_kinds = {}, {}, [], {}, None
        return TestRecords(procs, blocks, stacks, inproc, live, t0, kinds, inproc_kinds)

    def collect_window(self, window_serial: int, *, windows: set[int], single_client: bool,
                       window_kinds: dict | None = None):
        """A closed window's live blocks (taken out) and their stacks, outside
        a test: every test's images stay. With window_kinds ({address:
        kind}), the blocks come per kind: (records, stacks, {kind: records})."""
        t0 = time.monotonic_ns()
        live = self.tracked_serials() | {int_of(k) for k in self.procs.keys()}   # other clients' tests' images
        sweep = self.sweep_blocks({}, window_serial, live=live, t0=t0, windows=windows, single_client=single_client,
                                  window_kinds=window_kinds)
        stacks = self.stack_frames({h for _, h, _ in _window_records(sweep) if h})
        self.collect_stack_garbage(sweep)
        if window_kinds is None:
            return sweep.inproc, stacks
        return sweep.inproc, stacks, sweep.inproc_kinds

    def window_blocks(self, serial: int) -> list[tuple[int, int, int]]:
        """The live blocks of window `serial`, left in the map."""
        pick = lambda k, v: (v.size, v.stack, v.ext_ip) if v.serial == serial else None  # noqa: E731
        return [r for _, _, results in self.chunks(self.blocks, pick) for r in results if r is not None]

    def window_addresses(self, serial: int) -> list[tuple[int, int, int, int]]:
        """(tgid, address, size, ext_ip) of the live blocks of window
        `serial`, left in the map (what a scan of the window classifies)."""
        pick = lambda k, v: (k.tgid, k.addr, v.size, v.ext_ip) if v.serial == serial else None  # noqa: E731
        return [r for _, _, results in self.chunks(self.blocks, pick) for r in results if r is not None]

    def scratch_ranges(self) -> list[tuple[int, int]]:
        """The address ranges of this process's batch buffers: they hold
        copies of block addresses (keys), never roots of a scan of it."""
        out = []
        for bufs in self._batch_bufs.values():
            for b in (bufs if isinstance(bufs, tuple) else (bufs,)):
                out.append((ctypes.addressof(b), ctypes.addressof(b) + ctypes.sizeof(b)))
        return out

    def read_counters(self) -> list[int]:
        return [int(v.value) for v in self.counters.values()]

    def tracked_serials(self) -> set[int]:
        """Images of the processes tracked now (all clients' tests)."""
        return {int(v.serial) for _, v in self.tracked.items() if not int(v.flags) & TF_ROOT}

    def running_images(self, test_id: int) -> list[tuple[int, int]]:
        """(tgid, serial) of the test's processes tracked now that want leak kinds."""
        return [(int_of(k), int(v.serial)) for k, v in self.tracked.items()
                if not int(v.flags) & TF_ROOT and int(v.test_id) == test_id and int(v.flags) & TF_KINDS]

    def running(self, test_id: int) -> int:
        return sum(1 for _, v in self.tracked.items() if not int(v.flags) & TF_ROOT and int(v.test_id) == test_id)

    def drop_dead_images(self, garbage: set[int], live: set[int], t0: int) -> None:
        """Free the table blocks of images that are gone and owned by no test:
        `garbage`, and those the program listed in `dead` at their exec. When
        it could not list one (the map was full), the whole table is swept of
        images no live process or test owns."""
        if self.dead is not None:
            for k in list(self.dead.keys()):
                garbage.add(int_of(k))
                delete(self.dead, k)
        self.table.take(garbage - live, remove=True)
        ctrs = self.read_counters()
        lost = ctrs[CTR_LOST_DEAD] if len(ctrs) > CTR_LOST_DEAD else 0
        if lost != self.dead_lost:
            self.dead_lost = lost
            t0_serial = serial_at(t0)
            live_now = live | {int_of(k) for k in self.procs.keys()}
            self.table.sweep(lambda ss: np.fromiter((int(x) in live_now or int(x) >= t0_serial for x in ss.tolist()),
                                                    dtype=bool, count=len(ss)))

    def sweep_blocks(self, procs: dict, wserial: int, *, live: set, t0: int, windows: set[int],
                     single_client: bool, kinds: dict | None = None, window_kinds: dict | None = None,
                     walk_hash: bool = True) -> Sweep:
        """One walk of the live-block map: the blocks of `procs` (finished or
        untracked images of the test, per serial and stack) and of the closed
        window `wserial` are taken out; garbage (older than t0, owned by
        nothing live) is deleted; everything else stays, its stacks noted.
        kinds: {serial: {address: kind}} of scanned images, whose blocks are
        summed per (serial, kind) and stack (Sweep.kinds; an address the scan
        did not see is "unclassified"); window_kinds: {address: kind} of the
        window's blocks (Sweep.inproc_kinds)."""
        s = Sweep(started_ns=t0)
        if window_kinds is not None:
            s.inproc_kinds = {}
        wkinds = s.inproc_kinds
        agg: dict = {}   # serial, or (serial, kind) of a scanned image -> stack -> [bytes, blocks]
        kinds = kinds or {}
        inproc = s.inproc
        windows = windows - {wserial}
        t0_serial = serial_at(t0)
        referenced = s.referenced

        def pick(k, v):
            serial = v.serial
            if serial in procs:
                per = kinds.get(serial)
                owner = serial if per is None else (serial, per.get(k.addr, "unclassified"))
                a = agg.setdefault(owner, {}).setdefault(v.stack, [0, 0])
                a[0] += v.size
                a[1] += 1
                return DELETE
            if serial == wserial:
                if wkinds is None:
                    inproc.append((v.size, v.stack, v.ext_ip))
                else:
                    wkinds.setdefault(window_kinds.get(k.addr, "unclassified"), []).append(
                        (v.size, v.stack, v.ext_ip))
                return DELETE
            if serial in live or serial in windows or serial >= t0_serial:
                referenced.add(v.stack)
                return None
            return DELETE   # garbage

        if self.table is not None:
            # the table: the images' own regions only (they no longer change)
            for serial, (addrs, sizes, stacks) in self.table.take(procs.keys(), remove=True).items():
                per = kinds.get(serial)
                if per is None:
                    hs, inv = np.unique(stacks, return_inverse=True)
                    nbytes = np.bincount(inv, weights=sizes.astype(np.float64), minlength=len(hs))
                    nblocks = np.bincount(inv, minlength=len(hs))
                    a_ = agg.setdefault(serial, {})
                    for h, b, n in zip(hs.tolist(), nbytes.tolist(), nblocks.tolist()):
                        a = a_.setdefault(h, [0, 0])
                        a[0] += int(b)
                        a[1] += int(n)
                else:
                    for addr, size, h in zip(addrs.tolist(), sizes.tolist(), stacks.tolist()):
                        a = agg.setdefault((serial, per.get(addr, "unclassified")), {}).setdefault(h, [0, 0])
                        a[0] += size
                        a[1] += 1
        s.hash_walked = walk_hash
        if walk_hash:
            # One client, no open window, nothing live: every entry goes (ours or garbage)
            drain = not live and not windows and single_client
            for _ in self.select(self.blocks, pick, drain=drain):
                pass
        s.blocks = {owner: [(b, h, n) for h, (b, n) in per.items()] for owner, per in agg.items()}
        for owner in s.blocks:
            if isinstance(owner, tuple):
                s.kinds.setdefault(owner[0], []).append(owner[1])
        return s

    def image_blocks(self, tgid: int, serial: int) -> list[tuple[int, int]]:
        """The live blocks [(address, size)] of image `serial` (process
        `tgid`): its entry's ring and the block map, nothing removed."""
        out = []
        try:
            v = self.tracked[self.tracked.Key(tgid)]
        except KeyError:
            v = None
        if v is not None and int(v.serial) == serial and int(v.flags) & TF_RING:
            out += [(int(e.addr), int(e.size)) for e in v.ring if e.addr]
        if v is not None and int(v.serial) == serial and not int(v.alloc_blocks):
            return out   # it never recorded a block: none in the table or the hash (no region read)
        if self.table is not None:
            got = self.table.take((serial,), remove=False).get(serial)
            if got is not None:
                out += zip(got[0].tolist(), got[1].tolist())
            if v is None or int(v.serial) != serial or not int(v.overflowed):
                return out   # nothing of it in the hash (the overflow)
        # vectorised over each batch (a paused process's scan needs its own
        # blocks among every live block of the session)
        for keys, vals, n in self.chunks(self.blocks, None):
            k = _view(keys, n, ("tgid", "addr"))
            v = _view(vals, n, ("serial", "size"))
            mine = (k["tgid"] == tgid) & (v["serial"] == serial)
            out += zip(k["addr"][mine].tolist(), v["size"][mine].tolist())
        return out

    def stack_frames(self, hashes) -> dict[int, list]:
        """The frames of these stack hashes (those still in the map)."""
        out = {}
        for h in hashes:
            try:
                out[h] = self.frames(self.stacks[self.stacks.Key(h)])
            except KeyError:
                pass
        return out

    def collect_stack_garbage(self, sweep: Sweep) -> None:
        """Stacks are shared by every block (and every xdist worker's test)
        that was allocated from the same place, so they are not taken with a
        test's blocks: once the map is half full, delete those no remaining
        block refers to and no allocation used since the block walk began
        (the BPF program stamps a stack each time it is used)."""
        new = self.read_counters()[CTR_NEW_STACKS]
        if new - self.stacks_deleted < self.stack_gc_at:
            return
        keep = sweep.referenced | self.ring_stacks()
        if self.table is not None:
            keep |= self.table.live_stacks()
        if not sweep.hash_walked:
            keep |= {int(v.stack) for _, vals, n in self.chunks(self.blocks, None)
                     for v in (vals[i] for i in range(n))}
        # the program stamps a stack at most once per STACK_STAMP_NS
        since = sweep.started_ns - 2 * STACK_STAMP_NS
        dropped = 0

        def pick(k, v):
            nonlocal dropped
            if int(v.used) >= since or int_of(k) in keep:
                return None
            dropped += 1
            return DELETE

        for _ in self.select(self.stacks, pick):
            pass
        self.stacks_deleted += dropped
        left = new - self.stacks_deleted
        self.stack_gc_at = max(self.max_stacks // 2, left + self.max_stacks // 4)

    def remap_ip_stacks(self, sweep: Sweep, live: set, t0: int) -> dict:
        """Stacks the kernel returned as plain ips (it could not take the mmap
        lock: another thread was mapping memory) are resolved through the
        image's other captures (the BPF program's rawcache): the same ips map
        to the same build-id stack; otherwise each ip is placed in a module
        whose load bias (ip - file offset) the image's other stacks revealed.
        Takes the test's images' rawcache entries (and garbage) out, when it
        has to walk it: only when a stack of the test's is made of plain ips.
        (It is an LRU map: what is left in it is evicted as it fills. A walk
        of its 65,536 entries at every test's end cost ~10 ms a test.)"""
        blocks = sweep.blocks
        frames_of = sweep.frames
        t0_serial = serial_at(t0)
        depth = self.stack_depth

        owners = {o[0] if isinstance(o, tuple) else o for o in blocks}

        def pick(k, v):
            serial = k.serial
            if serial in owners:
                return (serial, k.rawhash, v.h, [v.ip[i] for i in range(min(v.n, depth))])
            if serial in live or serial >= t0_serial:
                return None
            return DELETE

        ip_only = {h for bl in blocks.values() for _, h, _ in bl if h}
        frames_of.update(self.stack_frames(ip_only - frames_of.keys()))
        ip_only = {h for h in ip_only if frames_of.get(h) and all(st == BUILD_ID_IP for st, _, _ in frames_of[h])}
        if not ip_only:
            return blocks
        cached = list(self.select(self.rawcache, pick))
        frames_of.update(self.stack_frames({h for _, _, h, _ in cached} - frames_of.keys()))
        biases: dict[int, set] = {}      # serial -> {(build_id, bias)}
        same: dict[tuple, int] = {}      # (serial, raw hash) -> build-id stack hash
        for serial, rh, h, ips in cached:
            same[(serial, rh)] = h
            frames = frames_of.get(h) or []
            if len(frames) == len(ips):
                for (st, bid, off), ip in zip(frames, ips):
                    if st == BUILD_ID_VALID:
                        biases.setdefault(serial, set()).add((bid, ip - off))
        out = {}
        for owner, bl in blocks.items():
            serial = owner[0] if isinstance(owner, tuple) else owner
            per: dict[int, list[int]] = {}
            for nbytes, h, n in bl:
                if h in ip_only:
                    h2 = same.get((serial, fnv_ips([ip for _, _, ip in frames_of[h]])))
                    if h2 in frames_of:
                        h = h2
                    elif serial in biases:
                        fixed = [place_ip(ip, biases[serial]) for _, _, ip in frames_of[h]]
                        h = hash(("remapped", serial, tuple(fixed)))
                        frames_of[h] = fixed
                a = per.setdefault(h, [0, 0])
                a[0] += nbytes
                a[1] += n
            out[owner] = [(b, h, n) for h, (b, n) in per.items()]
        return out

    def sweep_handoffs(self) -> None:
        """Hand-off slots live as long as their thread (the BPF program deletes
        them when a tracked thread exits); drop those of threads that ended
        untracked (still running at their test's end) or changed id at exec."""
        ho = self.handoffs
        gone = [k for k in list(ho.keys()) if not self.thread_alive(int(k.tid))]
        for k in gone:
            delete(ho, k)

    def untrack_test(self, test_id: int) -> dict[int, dict]:
        """Remove the test's still-running processes from `tracked`; return
        their live counters by serial. The blocks in their entries' rings go
        to the block map, with the rest of their blocks."""
        running: dict[int, dict] = {}
        for _ in range(3):
            found = False
            for k, v in list(self.tracked.items()):
                if int(v.flags) & TF_ROOT or int(v.test_id) != test_id:
                    continue
                found = True
                v = self.take(self.tracked, k)
                if v is None:
                    continue   # it ended meanwhile: the program finished it
                running[int(v.serial)] = counters_of(v)
                if int(v.overflowed):
                    running[int(v.serial)]["overflowed"] = int(v.overflowed)
                self.spill_ring(int(k.value), v)
            if not found:
                break
        return running

    def take(self, table, key):
        """Look up and delete in one step (the entry the BPF program last
        wrote); None when it is gone."""
        leaf = table.Leaf()
        if self.lib.bpf_lookup_and_delete(table.map_fd, ctypes.byref(key), ctypes.byref(leaf)) == 0:
            return leaf
        try:   # kernels before 5.14: no lookup-and-delete on hash maps
            leaf = table[key]
        except KeyError:
            return None
        delete(table, key)
        return leaf

    def spill_ring(self, tgid: int, v) -> None:
        """The blocks of an untracked image's ring into the block map."""
        if not int(v.flags) & TF_RING:
            return
        for e in v.ring:
            if e.addr:
                key = self.blocks.Key()
                key.tgid, key.addr = tgid, e.addr
                leaf = self.blocks.Leaf()
                leaf.size, leaf.ts, leaf.serial, leaf.stack = e.size, e.ts, v.serial, e.stack
                try:
                    self.blocks[key] = leaf
                except Exception:
                    v.lost_blocks += 1

    def ring_stacks(self) -> set[int]:
        """Stacks of the blocks in tracked images' rings."""
        return {int(e.stack) for _, v in self.tracked.items() if int(v.flags) & TF_RING
                for e in v.ring if e.addr and e.stack}

    def frames(self, v) -> list[tuple[int, str | None, int]]:
        out = []
        n = min(int(v.nframes), self.stack_depth)
        for i in range(n):
            f = v.frames[i]
            status = int(f.status)
            if status == BUILD_ID_VALID:
                out.append((status, bytes(f.build_id).hex(), int(f.offset)))
            elif status == BUILD_ID_IP:
                out.append((status, None, int(f.ip)))
            else:
                break
        return out

    # -- batched walks ------------------------------------------------------

    def select(self, table, pick, *, drain: bool = False):
        """Walk `table` in batches: pick(key, value) returns None to leave an
        entry, DELETE to delete it, or any other value, which is yielded and
        the entry deleted. Deletions are batched per chunk (a key that vanished
        meanwhile is skipped).
        drain: the caller knows every entry goes (pick never returns None):
        each batch is looked up and deleted in one call, ~2x faster."""
        ksize = ctypes.sizeof(table.Key)
        dbuf = self._batch_bufs.get(("del", id(table)))
        if dbuf is None:
            dbuf = self._batch_bufs[("del", id(table))] = (table.Key * BATCH_CHUNK)()
        for keys, n, results in self.chunks(table, pick, delete=drain):
            yield from (r for r in results if r is not None and r is not DELETE)
            if drain:
                continue
            if None not in results:          # the whole chunk goes (the common case)
                sel = range(n)
            else:
                sel = [i for i, r in enumerate(results) if r is not None]
                if not sel:
                    continue
            if len(sel) == n:
                base = ctypes.addressof(keys)
            else:
                for j, i in enumerate(sel):
                    ctypes.memmove(ctypes.addressof(dbuf) + j * ksize, ctypes.addressof(keys) + i * ksize, ksize)
                base = ctypes.addressof(dbuf)
            start = 0
            while start < len(sel):
                cnt = ctypes.c_uint32(len(sel) - start)
                at = ctypes.c_void_p(base + start * ksize)
                if self.lib.bpf_delete_batch(table.map_fd, at, ctypes.byref(cnt)) == 0:
                    break
                start += cnt.value + 1   # that key was deleted meanwhile (a free): skip it

    def chunks(self, table, pick, *, delete: bool = False):
        """(keys buffer, n, [pick(k, v) per entry]) per batch lookup (and
        delete, with delete=True); pick None: (keys buffer, values buffer, n)."""
        bufs = self._batch_bufs.get(id(table))
        if bufs is None:
            bufs = ((table.Key * BATCH_CHUNK)(), (table.Leaf * BATCH_CHUNK)())
            self._batch_bufs[id(table)] = bufs
        keys, vals = bufs
        fn = self.lib.bpf_lookup_and_delete_batch if delete else self.lib.bpf_lookup_batch
        token = ctypes.c_uint32(0)
        first = True
        while True:
            cnt = ctypes.c_uint32(BATCH_CHUNK)
            res = fn(table.map_fd, None if first else ctypes.byref(token), ctypes.byref(token),
                     ctypes.byref(keys), ctypes.byref(vals), ctypes.byref(cnt))
            err = ctypes.get_errno()
            n = cnt.value
            if n:
                yield (keys, vals, n) if pick is None else (keys, n, [pick(keys[i], vals[i]) for i in range(n)])
            if res != 0:
                if err == errno.ENOENT:
                    break
                raise OSError(err, f"BPF map batch operation failed: {os.strerror(err)}")
            first = False
