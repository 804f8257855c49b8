"""Fake BPF maps for the collection logic's unit tests: BCC's table interface
(Key, Leaf, map_fd, items, keys, values, [key], del) over a dict, and a `lib`
with BCC's batch calls over the same dicts, with the kernel's semantics
(a batch walk ends with ENOENT; a batch delete stops at a missing key)."""

import ctypes
import errno
import itertools

from pytest_memleak_ebpf.tracer import abi

PARAMS = {"STACK_DEPTH": 4, "EXE_LEN": 32}
_fds = itertools.count(100)


def struct(name):
    return abi.HEADER.struct(name, **PARAMS)


class FakeTable:
    def __init__(self, key, leaf):
        self.Key, self.Leaf = key, leaf
        self.map_fd = next(_fds)
        self.data = {}            # bytes(key) -> (seq, bytes(leaf))
        self._seq = itertools.count()

    def _k(self, key):
        if not isinstance(key, self.Key):
            key = self.Key(key)
        return bytes(key)

    def __setitem__(self, key, leaf):
        k = self._k(key)
        seq = self.data[k][0] if k in self.data else next(self._seq)
        self.data[k] = (seq, bytes(leaf))

    def __getitem__(self, key):
        try:
            return self.Leaf.from_buffer_copy(self.data[self._k(key)][1])
        except KeyError:
            raise KeyError(key) from None

    def __delitem__(self, key):
        del self.data[self._k(key)]

    def __len__(self):
        return len(self.data)

    def items(self):
        return [(self.Key.from_buffer_copy(k), self.Leaf.from_buffer_copy(v)) for k, (_, v) in self.data.items()]

    def keys(self):
        return [k for k, _ in self.items()]

    def values(self):
        return [v for _, v in self.items()]


class FakeArray(FakeTable):
    def __init__(self, leaf, n):
        super().__init__(ctypes.c_int, leaf)
        for i in range(n):
            self[i] = leaf()


class FakeLib:
    """bpf_lookup_batch & co. over FakeTables (found by map fd)."""

    def __init__(self, *tables, lookup_and_delete=True):
        self.tables = {t.map_fd: t for t in tables}
        self.lookup_and_delete = lookup_and_delete
        self.calls = []

    def _batch(self, fd, in_batch, out_batch, keys, vals, count, delete):
        t = self.tables[fd]
        start = 0 if in_batch is None else in_batch._obj.value
        want = count._obj.value
        rest = sorted((seq, k, v) for k, (seq, v) in t.data.items() if seq >= start)
        got = rest[:want]
        kbuf, vbuf = keys._obj, vals._obj
        for i, (_, k, v) in enumerate(got):
            ctypes.memmove(ctypes.addressof(kbuf) + i * ctypes.sizeof(t.Key), k, len(k))
            ctypes.memmove(ctypes.addressof(vbuf) + i * ctypes.sizeof(t.Leaf), v, len(v))
            if delete:
                del t.data[k]
        count._obj.value = len(got)
        if got:
            out_batch._obj.value = got[-1][0] + 1
        if len(rest) <= want:
            ctypes.set_errno(errno.ENOENT)
            return -1
        return 0

    def bpf_lookup_batch(self, fd, in_batch, out_batch, keys, vals, count):
        self.calls.append(("lookup_batch", fd))
        return self._batch(fd, in_batch, out_batch, keys, vals, count, False)

    def bpf_lookup_and_delete_batch(self, fd, in_batch, out_batch, keys, vals, count):
        self.calls.append(("lookup_and_delete_batch", fd))
        return self._batch(fd, in_batch, out_batch, keys, vals, count, True)

    def bpf_delete_batch(self, fd, at, count):
        self.calls.append(("delete_batch", fd))
        t = self.tables[fd]
        ksize = ctypes.sizeof(t.Key)
        n = count._obj.value
        for i in range(n):
            k = ctypes.string_at(at.value + i * ksize, ksize)
            if k not in t.data:
                count._obj.value = i
                ctypes.set_errno(errno.ENOENT)
                return -1
            del t.data[k]
        return 0

    def bpf_lookup_and_delete(self, fd, key, leaf):
        self.calls.append(("lookup_and_delete", fd))
        t = self.tables[fd]
        k = bytes(key._obj)
        if not self.lookup_and_delete or k not in t.data:
            return -1
        ctypes.memmove(ctypes.addressof(leaf._obj), t.data.pop(k)[1], ctypes.sizeof(t.Leaf))
        return 0


def fake_maps():
    """(maps by name, lib) shaped like the BPF program's."""
    maps = {
        "tracked": FakeTable(ctypes.c_uint32, struct("track_t")),
        "procs": FakeTable(ctypes.c_uint64, struct("proc_t")),
        "blocks": FakeTable(struct("block_key_t"), struct("block_t")),
        "stacks": FakeTable(ctypes.c_uint64, struct("stack_t")),
        "counters": FakeArray(ctypes.c_uint64, abi.CTR_NCOUNTERS),
        "rawcache": FakeTable(struct("rawkey_t"), struct("rawval_t")),
        "handoffs": FakeTable(struct("handoff_key_t"), struct("handoff_t")),
    }
    return maps, FakeLib(*maps.values())
