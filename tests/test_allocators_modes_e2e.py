"""The other allocators under every attach mode the kernel offers: uprobe
session links are the default (tests/test_allocators_e2e.py); uprobe_multi
links and perf-event uprobes use their own programs for the nested entry
points (memleak.bpf.c `*_nest`: jemalloc's `_Znam` calling `_Znwm`,
mimalloc's `mi_new` calling `malloc`, musl's `calloc` calling `malloc` must
count once), so each allocator with such an entry runs again here, forced to
each mode, with the same exact figures."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from kernel_features import attach_modes  # noqa: E402
from test_allocators_e2e import exes  # noqa: E402,F401 - the fixture
from test_allocators_e2e import test_each_allocator_is_probed_and_counts_exactly as counts_exactly  # noqa: E402

pytestmark = pytest.mark.ebpf

# one build per allocator with a nested entry point, C and C++
NESTED = ["cxx-link-jemalloc", "cxx-preload-jemalloc", "link-mimalloc", "cxx-link-mimalloc", "musl", "static-musl",
          "cxx-link-tcmalloc"]


@pytest.mark.parametrize("mode", [m for m in attach_modes() if m != "session"])
@pytest.mark.parametrize("name", NESTED)
def test_nested_entry_points_count_once_in_every_attach_mode(pytester, run_plugin, exes, monkeypatch,  # noqa: F811
                                                             name, mode):
    monkeypatch.setenv("PYTEST_MEMLEAK_EBPF_ATTACH", mode)
    counts_exactly(pytester, run_plugin, exes, name)
