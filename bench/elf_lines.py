"""DWARF line-program decoding: pyelftools against symbolize.py's own reader.

symbolize.py keeps a hand-written DWARF line reader (symbolize._RawDwarf,
_decode_line_program) next to pyelftools, which it uses as the fallback. This
script is the reason that reader may stay: it decodes the line programs of
whole objects both ways and prints the time each takes, cold and warm.

  cold: the first decoding in a fresh reader: open the file, read (and
        decompress) the sections, parse each CU's header and its line program;
  warm: decoding every CU's line program again with the sections already in
        memory (pyelftools: a fresh LineProgram per CU from the same
        DWARFInfo, whose CU headers are cached; ours: a fresh _LineTable per CU
        from the same _Sections).

Objects by default: libc's separate debug file (Debian: libc6-dbg, under
/usr/lib/debug/.build-id) and the libpython the running interpreter maps
(with its own DWARF when it was built with -g, as pyenv builds are); any
path on the command line replaces them. Both readers must agree: for every
address a CU's rows give, the (file, line) of the last row at that address
is compared, and a mismatch is an error (exit status 1).

  python bench/elf_lines.py                       # all CUs of both objects (minutes with pyelftools)
  python bench/elf_lines.py --max-cus 40          # the first 40 CUs of each: a quick look
  python bench/elf_lines.py /path/to/lib.so ...   # other objects

Not an eBPF benchmark: it needs no root and no lock, but like every timing
it means little while other work runs on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pytest_memleak_ebpf import symbolize  # noqa: E402
from pytest_memleak_ebpf.elf import read_build_id  # noqa: E402
from pytest_memleak_ebpf.procmaps import read_maps  # noqa: E402


def default_objects() -> list[str]:
    out = []
    libc = libpython = None
    for m in read_maps():
        base = os.path.basename(m.path)
        if base.startswith("libc.so") and libc is None:
            libc = m.path
        if base.startswith("libpython") and libpython is None:
            libpython = m.path
    if libc:
        bid = read_build_id(libc)
        dbg = bid and os.path.join("/usr/lib/debug/.build-id", bid.hex()[:2], bid.hex()[2:] + ".debug")
        out.append(dbg if dbg and os.path.isfile(dbg) else libc)
    if libpython is None:  # a statically linked interpreter: its executable holds the DWARF
        libpython = os.path.realpath(sys.executable)
    out.append(libpython)
    return out


def _clock():
    return time.perf_counter(), time.process_time()


def _since(t):
    w, c = _clock()
    return {"wall_s": round(w - t[0], 4), "cpu_s": round(c - t[1], 4)}


def ours(path: str, max_cus: int | None):
    """(cold, warm, rows per CU offset as {cu: {address: (file, line)}}) with symbolize's reader."""
    def run(raw):
        tables = {}
        for i, cu in enumerate(raw.iter_cus()):
            if max_cus is not None and i >= max_cus:
                break
            t = raw.line_table(cu)
            if t is not None:
                tables[cu.offset] = t
        return tables

    t0 = _clock()
    sections = symbolize.Sections(path)
    raw = symbolize._RawDwarf(sections)
    tables = run(raw)
    cold = _since(t0)
    t0 = _clock()
    run(symbolize._RawDwarf(sections))
    warm = _since(t0)
    return cold, warm, tables


def theirs(path: str, max_cus: int | None):
    """(cold, warm, {cu offset: {address: (file index, line)}}) with pyelftools."""
    from elftools.elf.elffile import ELFFile

    def run(di):
        out = {}
        for i, cu in enumerate(di.iter_CUs()):
            if max_cus is not None and i >= max_cus:
                break
            lp = di.line_program_for_CU(cu)
            if lp is None:
                continue
            rows = {}
            seq = {}
            for e in lp.get_entries():
                st = e.state
                if st is None:
                    continue
                if st.end_sequence:  # rows at or past the end cover no instruction
                    rows.update((a, v) for a, v in seq.items() if a < st.address)
                    seq = {}
                    continue
                seq[st.address] = (st.file, st.line)
            rows.update(seq)
            out[cu.cu_offset] = rows
        return out

    t0 = _clock()
    f = open(path, "rb")
    di = ELFFile(f).get_dwarf_info(relocate_dwarf_sections=False, follow_links=False)
    rows = run(di)
    cold = _since(t0)
    di._linetable_cache.clear()   # else pyelftools hands back the LinePrograms it decoded
    t0 = _clock()
    run(di)
    warm = _since(t0)
    f.close()
    return cold, warm, rows


def compare(tables, rows) -> tuple[int, int, list]:
    """(addresses compared, CUs compared, first mismatches)."""
    n = cus = 0
    bad = []
    for off, want in rows.items():
        t = tables.get(off)
        if t is None:
            if want:
                bad.append((hex(off), "CU missing in ours"))
            continue
        cus += 1
        for addr, (file, line) in want.items():
            got = t.seqs.lookup(addr)
            n += 1
            if got != (file, line & symbolize._LINE_MASK):
                bad.append((hex(off), hex(addr), got, (file, line)))
                if len(bad) > 10:
                    return n, cus, bad
    return n, cus, bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("objects", nargs="*", help="ELF files with DWARF (default: libc's debug file, libpython)")
    ap.add_argument("--max-cus", type=int, default=None, help="decode only the first N compile units of each")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    objects = args.objects or default_objects()
    report = []
    status = 0
    for path in objects:
        size = os.path.getsize(path)
        o_cold, o_warm, tables = ours(path, args.max_cus)
        p_cold, p_warm, rows = theirs(path, args.max_cus)
        n, cus, bad = compare(tables, rows)
        entry = {"object": path, "size": size, "cus": cus, "addresses": n,
                 "ours": {"cold": o_cold, "warm": o_warm}, "pyelftools": {"cold": p_cold, "warm": p_warm},
                 "cold_ratio_cpu": round(p_cold["cpu_s"] / max(o_cold["cpu_s"], 1e-9), 1),
                 "warm_ratio_cpu": round(p_warm["cpu_s"] / max(o_warm["cpu_s"], 1e-9), 1),
                 "mismatches": bad}
        report.append(entry)
        print(f"{path} ({size:,} B): {cus} CUs, {n:,} addresses compared"
              f"{'' if not bad else f', {len(bad)} MISMATCHES: {bad[:3]}'}")
        print(f"  ours        cold {o_cold['cpu_s']:8.3f} s CPU ({o_cold['wall_s']:.3f} wall)   "
              f"warm {o_warm['cpu_s']:8.3f} s CPU ({o_warm['wall_s']:.3f} wall)")
        print(f"  pyelftools  cold {p_cold['cpu_s']:8.3f} s CPU ({p_cold['wall_s']:.3f} wall)   "
              f"warm {p_warm['cpu_s']:8.3f} s CPU ({p_warm['wall_s']:.3f} wall)")
        print(f"  pyelftools / ours (CPU): cold {entry['cold_ratio_cpu']}x, warm {entry['warm_ratio_cpu']}x")
        if bad:
            status = 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return status


if __name__ == "__main__":
    sys.exit(main())
