"""Leak suppressions in LeakSanitizer's syntax, and the default list of memory
glibc, the dynamic loader and libstdc++ keep on purpose until exit.

File syntax (the same as LSan's ``LSAN_OPTIONS=suppressions=FILE``)::

    # the index is rebuilt per call on purpose (tracked in #123)
    leak:kv_index_build
    leak:^libfoo_init$
    leak:third_party/zlib/*
    leak:libcrypto.so

One ``leak:<pattern>`` per line; blank lines and lines starting with ``#`` are
ignored; surrounding whitespace is stripped. Any other suppression type
(``race:``, ``interceptor_via_fun:``, ...) or a malformed line raises
:class:`SuppressionError` naming the file, the line number and the text.

Pattern semantics (LSan's ``TemplateMatch``): ``*`` matches any run of
characters, a leading ``^`` anchors at the start, a trailing ``$`` at the end;
everything else is literal, and a pattern without anchors matches as a
substring. A stack is suppressed when the pattern matches the function name,
the module (the full path of the executable or shared object, as LSan uses
it) or the source file name of ANY of its frames. Deliberate differences
from LSan: whitespace after ``leak:`` is stripped; matching backtracks (LSan's matcher takes the first occurrence of
each literal piece, so e.g. ``a$`` never matches ``aba`` in LSan; every stack
LSan suppresses is suppressed here too), and a ``$`` anywhere but at the end, an
empty pattern, a pattern made only of anchors, or ``leak:foo  # comment``
(which LSan would read as a pattern ending in ``# comment`` that never
matches) are rejected instead of being silently useless or match-everything.

Anchored suppressions (all the defaults) additionally carry ``top_frames`` (only
the N innermost frames are considered) and ``modules`` (basename globs): the
frame that matches must be inside one of those modules AND so must every frame
below it, down to frame 0 (the caller of malloc). So a user's own function
with a libc-like name, a user callback called by libc, or a libc function
somewhere up the user's stack never hides a real leak.

The special pattern ``<static initializer>`` matches a frame whose function
could not be named (the library has no symbol table, e.g. Debian's
libstdc++) when its address lies in one of the module's static constructors
(the functions listed in its ``.init_array``); this is the only thing here that
reads files (the module's ELF, cached), and only for such frames.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from .classify import LOST_KINDS
from .elf import init_functions

__all__ = [
    "Suppression",
    "SuppressionError",
    "SuppressionUse",
    "SuppressionSummary",
    "DEFAULT_SUPPRESSIONS",
    "STATIC_INITIALIZER",
    "parse_suppressions",
    "from_patterns",
    "load_suppression_files",
    "match",
    "apply",
    "suppression_target",
    "pattern_matches",
    "is_static_initializer",
]

STATIC_INITIALIZER = "<static initializer>"


class SuppressionError(ValueError):
    """A bad suppression file or line; the message names where and what."""


@dataclass(frozen=True)
class Suppression:
    pattern: str
    source: str                     # 'default', 'path:line' or 'marker'
    top_frames: int | None = None   # only match within the N innermost frames (defaults use this)
    modules: tuple[str, ...] = ()   # frame must be in a module whose basename matches one of these globs
    reason: str = field(default="", compare=False)  # why (the defaults say why glibc keeps it)

    def describe(self) -> str:
        return f"leak:{self.pattern} ({self.source})"


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------

# Types other sanitizers accept in the same file format: named in the error.
_OTHER_SANITIZER_TYPES = {
    "race", "race_top", "thread", "mutex", "signal", "deadlock", "called_from_lib",
    "interceptor_via_fun", "interceptor_via_lib", "interceptor_name", "odr_violation",
    "vptr_check", "src", "fun", "global", "type", "lib", "mainfile", "alloc_dealloc_mismatch",
}


def _pattern_problem(pattern: str) -> str | None:
    if not pattern:
        return "empty pattern (it would match every stack; write leak:* if that is meant)"
    core = pattern[1:] if pattern.startswith("^") else pattern
    core = core[:-1] if core.endswith("$") else core
    if not core:
        return "pattern has nothing but anchors (it would match every stack; write leak:* if that is meant)"
    if "$" in core:
        return "'$' may only end a pattern (LSan ignores everything after it)"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in pattern):
        return "control character in pattern"
    if re.search(r"\s#", pattern):
        return "inline comments are not supported (LSan reads '# ...' as part of the pattern, which then never matches)"
    return None


class _LineProblem(Exception):
    pass


def _parse_line(line: str) -> str | None:
    """The pattern of one stripped line (None for a blank or comment line);
    raises _LineProblem(what is wrong)."""
    if not line or line.startswith("#"):
        return None
    if line.startswith("{") or line.startswith("}"):
        raise _LineProblem("this looks like a valgrind suppression; write LSan-style lines such as leak:<function>")
    kind, colon, pattern = line.partition(":")
    if not colon:
        raise _LineProblem("expected 'leak:<pattern>'")
    if kind != "leak":
        if kind.strip() == "leak":
            raise _LineProblem("no space allowed between 'leak' and ':'")
        if kind in _OTHER_SANITIZER_TYPES:
            raise _LineProblem(f"unsupported suppression type {kind!r} (only 'leak:' applies to leaks)")
        raise _LineProblem(f"unknown suppression type {kind!r} (expected 'leak:<pattern>')")
    pattern = pattern.strip()
    problem = _pattern_problem(pattern)
    if problem:
        raise _LineProblem(problem)
    return pattern


def parse_suppressions(text: str, source_name: str) -> list[Suppression]:
    """Suppressions from the text of a suppression file; ``source_name`` (a
    path) names them (``path:line``) and is used in error messages."""
    out: list[Suppression] = []
    for lineno, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        try:
            pattern = _parse_line(line)
        except _LineProblem as exc:
            raise SuppressionError(f"{source_name}:{lineno}: {exc}: {line!r}") from None
        if pattern is not None:
            out.append(Suppression(pattern=pattern, source=f"{source_name}:{lineno}"))
    return out


def from_patterns(patterns: Iterable[str], source: str = "marker") -> list[Suppression]:
    """Suppressions from a list of patterns (``'leak:foo'`` or a bare ``'foo'``),
    e.g. from a marker; all get ``source``, which also names them in errors
    (``marker #2: ...``)."""
    out = []
    for i, p in enumerate(patterns, 1):
        if not isinstance(p, str):
            raise SuppressionError(f"{source} #{i}: not a string: {p!r}")
        text = p.strip()
        m = re.match(r"([A-Za-z_]+)\s*:(?!:)", text)
        if not (m and (m.group(1) == "leak" or m.group(1) in _OTHER_SANITIZER_TYPES)):
            text = "leak:" + text
        try:
            if "\n" in text or "\r" in text:
                raise _LineProblem("a pattern cannot span lines")
            pattern = _parse_line(text)
            if pattern is None:
                raise _LineProblem("expected 'leak:<pattern>'")
        except _LineProblem as exc:
            raise SuppressionError(f"{source} #{i}: {exc}: {p!r}") from None
        out.append(Suppression(pattern, source))
    return out


def load_suppression_files(paths: Iterable[str | os.PathLike]) -> list[Suppression]:
    """Suppressions from files, in order. An unreadable or non-UTF-8 file, or a
    bad line, raises SuppressionError naming the path."""
    out: list[Suppression] = []
    for path in paths:
        name = os.fspath(path)
        try:
            with open(name, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise SuppressionError(
                f"cannot read suppression file {name}: {exc.strerror or exc}"
                + (f" (errno {exc.errno})" if exc.errno else "")
            ) from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SuppressionError(f"suppression file {name} is not UTF-8 text: {exc}") from None
        out.extend(parse_suppressions(text, name))
    return out


# --------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------

@functools.lru_cache(maxsize=4096)
def _compile(pattern: str) -> re.Pattern:
    start = pattern.startswith("^")
    body = pattern[1:] if start else pattern
    end = body.endswith("$")
    if end:
        body = body[:-1]
    rx = ".*".join(re.escape(piece) for piece in body.split("*"))
    return re.compile(("^" if start else "") + rx + (r"\Z" if end else ""), re.DOTALL)


def pattern_matches(pattern: str, text: str | None) -> bool:
    """LSan template matching of one string (None or empty never matches)."""
    if not text:
        return False
    return _compile(pattern).search(text) is not None


@functools.lru_cache(maxsize=8192)
def _module_in(module: str, globs: tuple[str, ...]) -> bool:
    base = os.path.basename(module)
    return any(fnmatch.fnmatchcase(base, g) for g in globs)


def _in_modules(frame: Mapping, globs: Sequence[str]) -> bool:
    module = frame.get("module")
    return bool(module) and _module_in(module, tuple(globs))


def _frame_matches(s: Suppression, frame: Mapping) -> bool:
    fn = frame.get("function")
    if s.pattern == STATIC_INITIALIZER:
        return not fn and is_static_initializer(frame)
    return (pattern_matches(s.pattern, fn)
            or pattern_matches(s.pattern, frame.get("module"))
            or pattern_matches(s.pattern, frame.get("file")))


class _Matcher:
    """match() for many stacks: which suppressions' patterns match a frame is
    computed once per distinct frame (stacks share most of their frames)."""

    def __init__(self, suppressions: Sequence[Suppression]):
        self.sups = list(suppressions)
        self._hits: dict[tuple, tuple[int, ...]] = {}
        self._by_module: dict[str | None, tuple] = {}

    def _eligible(self, module: str | None) -> tuple:
        """(indices of the suppressions that may match a frame of this module,
        one alternation regex of their patterns, whether one is STATIC_INITIALIZER)."""
        got = self._by_module.get(module)
        if got is None:
            idx = tuple(k for k, s in enumerate(self.sups)
                        if not s.modules or (module and _module_in(module, s.modules)))
            plain = [self.sups[k].pattern for k in idx if self.sups[k].pattern != STATIC_INITIALIZER]
            rx = re.compile("|".join(f"(?:{_compile(p).pattern})" for p in plain), re.DOTALL) if plain else None
            static = any(self.sups[k].pattern == STATIC_INITIALIZER for k in idx)
            got = self._by_module[module] = (idx, rx, static)
        return got

    def _pattern_hits(self, frame: Mapping) -> tuple[int, ...]:
        fn = frame.get("function")
        module = frame.get("module")
        key = (fn, module, frame.get("file"),
               None if fn else frame.get("address"), None if fn else frame.get("build_id"))
        hits = self._hits.get(key)
        if hits is None:
            idx, rx, static = self._eligible(module)
            could = (static and not fn) or (rx is not None and any(
                t and rx.search(t) for t in (fn, module, frame.get("file"))))
            hits = tuple(k for k in idx if _frame_matches(self.sups[k], frame)) if could else ()
            if len(self._hits) > 200_000:
                self._hits.clear()
            self._hits[key] = hits
        return hits

    def __call__(self, frames: Sequence[Mapping]) -> Suppression | None:
        if not self.sups:
            return None
        runs: dict[tuple[str, ...], int] | None = None
        for i, frame in enumerate(frames):
            for k in self._pattern_hits(frame):
                s = self.sups[k]
                if s.top_frames is not None and i >= s.top_frames:
                    continue
                if s.modules:
                    if runs is None:
                        runs = {}
                    run = runs.get(s.modules)
                    if run is None:
                        run = 0
                        for f in frames:
                            if not _in_modules(f, s.modules):
                                break
                            run += 1
                        runs[s.modules] = run
                    if i >= run:
                        continue
                return s
        return None


def match(frames: Sequence[Mapping], suppressions: Sequence[Suppression]) -> Suppression | None:
    """The suppression that hides a stack (``frames`` innermost first), or None.

    Like LSan, frames are tried innermost first and, for each frame, the
    suppressions in order: the first hit wins (LSan tries every
    suppression on a frame's module before its function and file; that only
    changes which suppression is credited, never whether a stack is hidden). A suppression with
    ``top_frames`` only considers that many innermost frames; one with
    ``modules`` only a frame inside those modules, with every frame below it
    (down to frame 0) inside them too."""
    return _Matcher(suppressions)(frames)


# --------------------------------------------------------------------------
# Static constructors of a module (for frames without a function name)
# --------------------------------------------------------------------------

def is_static_initializer(frame: Mapping) -> bool:
    """True when the frame's address (a file offset, as the tracer records it)
    lies in a function listed in its module's ``.init_array``. False when
    anything is missing or does not match (module gone, other build id, ...)."""
    module, off = frame.get("module"), frame.get("address")
    if not module or not isinstance(off, int):
        return False
    info = init_functions(module)
    if info is None:
        return False
    bid = frame.get("build_id")
    if bid and info.build_id and bid.lower() != info.build_id:
        return False
    return info.in_initializer(off)


# --------------------------------------------------------------------------
# Default suppressions
# --------------------------------------------------------------------------

_LIBC = ("libc.so*", "libc-2.*.so")
_LDSO = ("ld-linux*.so*", "ld-2.*.so", "ld64.so*")
_LIBSTDCXX = ("libstdc++.so*",)

# (pattern, modules, top_frames, reason). Function names are glibc 2.36's
# (Debian 12) as our symbolizer names them (global alias preferred, compiler
# clone suffixes such as .part.0 kept, hence prefix rather than exact patterns).
# Each top_frames=1 entry names functions that themselves call malloc
# (checked against libc's call sites, tests/data/suppressions/
# glibc236_malloc_callers.txt) and whose blocks glibc keeps for the life of the
# process, freeing them only in __libc_freeres (valgrind's --run-libc-freeres)
# or never. Deliberately NOT here: functions whose blocks the program owns
# (__gconv_open / __gconv_lookup_cache of an iconv_t, __fopen_internal, newlocale,
# __alloc_dir, getaddrinfo, getdelim, ...) and generic helpers (strdup, strndup,
# tsearch, asprintf) whose caller is not on Debian's frame-pointer-less stacks.
# top_frames=2 entries name callers of generic helpers (strdup, strndup,
# tsearch): they only take effect where libc is built with frame pointers (on
# Debian 12 the stack ends at the first libc frame), and only when frame 0
# (the helper) is in libc too.
_DEFAULTS: list[tuple[str, tuple[str, ...], int, str]] = [
    # --- stdio
    ("^_IO_file_doallocate", _LIBC, 1,
     "stdio buffer of a FILE, allocated on first use: stdin/stdout/stderr are never closed "
     "(a leaked fopen()ed FILE is still reported through its __fopen_internal block)"),
    ("^_IO_wfile_doallocate", _LIBC, 1, "wide-character stdio buffer (wprintf etc.) of a never-closed stream"),
    # --- locale, gettext, time zones
    ("^_nl_", _LIBC, 2,
     "locale data, locale aliases and message catalogs loaded by setlocale/newlocale/gettext: cached for the process lifetime"),
    ("^read_alias_file", _LIBC, 1, "locale.alias table read by setlocale/gettext, cached"),
    ("^new_composite_name", _LIBC, 1, "setlocale(LC_ALL, ...) composite locale name, kept as the current name"),
    ("^setlocale", _LIBC, 2, "locale names strdup()ed by setlocale for the current locale"),
    ("^set_binding_values", _LIBC, 1, "bindtextdomain/bind_textdomain_codeset bindings, kept"),
    ("textdomain", _LIBC, 2, "textdomain() domain name, kept as the current domain"),
    ("^__dcigettext", _LIBC, 2, "translations found by gettext(), cached"),
    ("^__gettextparse", _LIBC, 1, "plural-forms expression of a loaded message catalog, cached"),
    ("^__wcsmbs_load_conv", _LIBC, 1, "the locale's multibyte/wide-character conversion functions, cached"),
    ("^__tzfile_read", _LIBC, 1, "time zone file (/etc/localtime or $TZ) parsed by tzset/localtime, cached"),
    ("^__tzstring", _LIBC, 1, "time zone abbreviations (tzname strings): never freed, tzname may point to them"),
    ("^tzset_internal", _LIBC, 2, "copy of $TZ kept by tzset"),
    # --- iconv (gconv): the caches only; a leaked iconv_t (__gconv_open,
    #     __gconv_lookup_cache) stays reported
    ("^__gconv_find_shlib", _LIBC, 1, "loaded gconv (iconv) modules: never unloaded"),
    ("^__gconv_load_cache", _LIBC, 1, "gconv-modules.cache read into memory when it cannot be mapped"),
    ("^__gconv_read_conf", _LIBC, 1, "gconv-modules configuration, parsed once"),
    ("^__gconv_get_path", _LIBC, 1, "gconv module search path, computed once"),
    ("^add_module", _LIBC, 1, "gconv-modules configuration entries, parsed once"),
    ("^add_alias2", _LIBC, 1, "gconv-modules charset aliases, parsed once"),
    ("^find_derivation", _LIBC, 1, "cached iconv conversion chains"),
    # --- NSS (getpwnam & co.) and the resolver
    ("^__nss_", _LIBC, 1,
     "NSS state: nsswitch.conf actions, loaded NSS modules, getXXent() result buffers"),
    ("^nss_", _LIBC, 1, "NSS database and files-backend state"),
    ("^global_state_allocate", _LIBC, 1, "NSS database global state (nsswitch.conf)"),
    ("^getpwnam", _LIBC, 1, "static result buffer of getpwnam(), reused by later calls"),
    ("^getpwuid", _LIBC, 1, "static result buffer of getpwuid(), reused by later calls"),
    ("^getgrnam", _LIBC, 1, "static result buffer of getgrnam(), reused by later calls"),
    ("^getgrgid", _LIBC, 1, "static result buffer of getgrgid(), reused by later calls"),
    ("^getspnam", _LIBC, 1, "static result buffer of getspnam(), reused by later calls"),
    ("^getsgnam", _LIBC, 1, "static result buffer of getsgnam(), reused by later calls"),
    ("^gethostbyname", _LIBC, 1, "static result buffer of gethostbyname()/gethostbyname2(), reused"),
    ("^gethostbyaddr", _LIBC, 1, "static result buffer of gethostbyaddr(), reused"),
    ("^getnetbyname", _LIBC, 1, "static result buffer of getnetbyname(), reused"),
    ("^getnetbyaddr", _LIBC, 1, "static result buffer of getnetbyaddr(), reused"),
    ("^getprotobyname", _LIBC, 1, "static result buffer of getprotobyname(), reused"),
    ("^getprotobynumber", _LIBC, 1, "static result buffer of getprotobynumber(), reused"),
    ("^getservbyname", _LIBC, 1, "static result buffer of getservbyname(), reused"),
    ("^getservbyport", _LIBC, 1, "static result buffer of getservbyport(), reused"),
    ("^getrpcbyname", _LIBC, 1, "static result buffer of getrpcbyname(), reused"),
    ("^getrpcbynumber", _LIBC, 1, "static result buffer of getrpcbynumber(), reused"),
    ("^getaliasbyname", _LIBC, 1, "static result buffer of getaliasbyname(), reused"),
    ("^__nscd_get_mapping", _LIBC, 1, "nscd shared-memory mapping descriptor, cached"),
    ("^__resolv_", _LIBC, 1, "resolver configuration (/etc/resolv.conf) and context, cached"),
    ("^get_locked_global", _LIBC, 1, "resolver configuration global state"),
    ("^__libc_alloc_buffer_allocate", _LIBC, 1,
     "resolv.conf configuration block (glibc 2.36 calls this only from __resolv_conf_allocate)"),
    ("^__libc_dynarray_emplace_enlarge", _LIBC, 1,
     "glibc-internal growable arrays kept by libc (resolv.conf servers, pthread_atfork handlers); "
     "results handed to callers are copied by __libc_dynarray_finalize, which is not suppressed"),
    ("^__libc_dynarray_resize", _LIBC, 1, "glibc-internal growable arrays kept by libc"),
    ("^__check_pf", _LIBC, 1, "getaddrinfo's cached list of local interface addresses (netlink)"),
    ("^gaiconf_init", _LIBC, 1, "/etc/gai.conf tables of getaddrinfo, parsed once"),
    ("^add_prefixlist", _LIBC, 1, "/etc/gai.conf tables of getaddrinfo, parsed once"),
    ("^_res_hconf_", _LIBC, 1, "/etc/host.conf state of the resolver"),
    ("^functions_allocate", _LIBC, 1, "libidn2 function table of getaddrinfo(AI_IDN), kept"),
    # --- threads, dlerror, misc libc state
    ("^_dlerror_run", _LIBC, 1, "per-thread dlerror() state, freed at thread exit but not for the main thread"),
    ("^pthread_setspecific", _LIBC, 1,
     "thread-specific-data array for keys >= 32, freed at thread exit but not for the main thread"),
    ("^__rpc_thread_", _LIBC, 1, "SunRPC per-thread state"),
    ("^__add_to_environ", _LIBC, 1,
     "setenv()/putenv(): glibc never frees environment strings or arrays (they may still be referenced)"),
    ("^ttyname", _LIBC, 1, "static result buffer of ttyname(), reused"),
    ("^getut", _LIBC, 1, "static result buffer of getutent()/getutid()/getutline(), reused"),
    ("^fcvt", _LIBC, 1, "static result buffer of fcvt(), reused"),
    ("^qfcvt", _LIBC, 1, "static result buffer of qfcvt(), reused"),
    ("^fstab_init", _LIBC, 1, "getfsent() state, reused"),
    ("^setfsent", _LIBC, 1, "getfsent() state, reused"),
    ("^allocate$", _LIBC, 1, "static result buffers of getmntent()/getnetgrent() (the local 'allocate' in mntent.c, getnetgrent.c)"),
    ("^initshells", _LIBC, 1, "getusershell() list, kept until endusershell()"),
    ("^__aio_enqueue_request", _LIBC, 1, "POSIX AIO request pool, reused and never freed"),
    ("^__gai_enqueue_request", _LIBC, 1, "getaddrinfo_a request pool, reused and never freed"),
    ("^__new_exitfn", _LIBC, 1,
     "atexit()/__cxa_atexit() lists beyond the first 32 handlers (freed only while exit handlers run)"),
    ("^register_printf_", _LIBC, 1, "printf extension tables (register_printf_specifier & co.), kept"),
    ("^__assert_fail_base", _LIBC, 1, "assert() failure message: the process aborts right after"),
    # --- the dynamic loader (ld.so allocates nothing on behalf of the program)
    ("^allocate_dtv", _LDSO, 1, "dynamic thread vector (DTV) of a thread; kept with cached thread stacks"),
    ("^_dl_allocate_tls", _LDSO, 1, "static TLS / DTV of a thread; kept with cached thread stacks"),
    ("^_dl_resize_dtv", _LDSO, 1, "DTV grown for a dlopen()ed TLS module"),
    ("tls_get_addr", _LDSO, 1,
     "TLS block of a dlopen()ed module, allocated on first access (also LSan's built-in suppression)"),
    ("^_dl_", _LDSO, 1,
     "loader bookkeeping: link maps, scopes, search paths, symbol-version and _dl_find_object tables of "
     "loaded objects (also those libc dlopen()s itself: NSS, iconv and libgcc_s modules)"),
    ("*", _LDSO, 1, "anything else the dynamic loader allocates (object names, dlopen work lists)"),
    # --- libstdc++
    ("pool::pool", _LIBSTDCXX, 1,
     "libstdc++'s emergency exception-allocation pool (eh_alloc.cc), allocated at start-up and kept"),
    ("^_GLOBAL__sub_I_", _LIBSTDCXX, 1,
     "allocations of libstdc++'s static constructors (the emergency exception pool of eh_alloc.cc when inlined)"),
    (STATIC_INITIALIZER, _LIBSTDCXX, 1,
     "allocations of libstdc++'s static constructors when libstdc++ has no symbol table (Debian, Ubuntu): "
     "the 72,704-byte emergency exception pool"),
]

DEFAULT_SUPPRESSIONS: tuple[Suppression, ...] = tuple(
    Suppression(pattern=p, source="default", top_frames=top, modules=mods, reason=why)
    for p, mods, top, why in _DEFAULTS
)


# --------------------------------------------------------------------------
# Applying suppressions to a test's result
# --------------------------------------------------------------------------

@dataclass
class SuppressionUse:
    """One line of "Suppressions used" (LSan's count / bytes / template)."""
    stacks: int
    bytes: int
    blocks: int
    pattern: str
    source: str


@dataclass
class SuppressionSummary:
    matches: dict[int, Suppression]           # id(StackLeak) -> the suppression that hides it
    used: list[SuppressionUse]                # largest first (processes and in-process stacks)

    def suppression_for(self, stack) -> Suppression | None:
        return self.matches.get(id(stack))

    def is_suppressed(self, stack) -> bool:
        return id(stack) in self.matches


def apply(result, suppressions: Sequence[Suppression]) -> SuppressionSummary:
    """Which stacks of a TestLeakResult the suppressions hide, and how much
    each suppression hid. Pure: nothing in ``result`` is modified (the figures
    after suppression are verdict.settle's).

    Stacks that were not captured never match. Stacks of
    ``result.in_process`` (the pytest process's own blocks), when present, are
    matched too. The defaults (and an allocator's) describe memory a library
    keeps for the process's life: they never hide a stack the scan found lost
    (kind definite or indirect) -- nothing keeps that memory any more."""
    matcher = _Matcher(suppressions)
    own = [x for x in suppressions if x.source != "default"]
    lost_matcher = matcher if len(own) == len(suppressions) else _Matcher(own)
    matches: dict[int, Suppression] = {}
    per_use: dict[Suppression, list[int]] = {}
    order: list[Suppression] = []
    per_kind: dict = {}
    stacks = [(s, _process_matcher(p, suppressions, matcher, per_kind)) for p in result.processes for s in p.stacks]
    if getattr(result, "in_process", None) is not None:
        stacks += [(s, matcher) for s in result.in_process.stacks]
    for s, m in stacks:
        if not getattr(s, "captured", True):
            continue
        if getattr(s, "kind", None) in LOST_KINDS:
            m = lost_matcher
        hit = m(s.frames)
        if hit is None:
            continue
        matches[id(s)] = hit
        if hit not in per_use:
            per_use[hit] = [0, 0, 0]
            order.append(hit)
        u = per_use[hit]
        u[0] += 1
        u[1] += s.bytes
        u[2] += s.blocks
    used = [SuppressionUse(per_use[s][0], per_use[s][1], per_use[s][2], s.pattern, s.source) for s in order]
    used.sort(key=lambda u: (-u.bytes, -u.blocks, -u.stacks))
    return SuppressionSummary(matches, used)


# --------------------------------------------------------------------------
# The defaults of the allocator a process uses (allocators.Allocator kind)
# --------------------------------------------------------------------------

EXECUTABLE = "<executable>"   # in `modules`: the process's own executable (a static program)
_TCMALLOC = ("libtcmalloc*.so*",)

# Start-up allocations an allocator or a static runtime makes before main and
# keeps until exit. Each applies only to the processes whose allocator is of
# its kind (when the defaults are on), anchored like the defaults above.
ALLOCATOR_DEFAULTS: dict[str, list[tuple[str, tuple[str, ...], int, str]]] = {
    "tcmalloc": [
        ("^TCMallocGuard::TCMallocGuard", _TCMALLOC, 1,
         "tcmalloc's start-up guard object (a static initializer of libtcmalloc), kept"),
        ("^MallocExtension::Register", _TCMALLOC, 1, "tcmalloc's MallocExtension instance, registered at start-up"),
        ("^MallocExtension::Initialize", _TCMALLOC + _LIBC, 2,
         "tcmalloc's start-up setenv(\"GLIBCXX_FORCE_NEW\"): glibc's tsearch node of the value"),
        ("^tsearch$", _LIBC, 1,
         "the same setenv's other tsearch node, whose stack ends in libc (tcmalloc has no frame pointers): in a "
         "tcmalloc process a tsearch() block with no caller visible is not reported"),
    ],
    "static-glibc": [
        ("^_dl_", (EXECUTABLE,), 1,
         "static glibc's loader state set up before main (_dl_non_dynamic_init: search paths, its own link "
         "map, _dl_find_object tables, the origin path)"),
        ("^_GLOBAL__sub_I_eh_alloc.cc$", (EXECUTABLE,), 1,
         "libstdc++'s emergency exception-allocation pool linked into a static C++ program"),
    ],
}


@functools.lru_cache(maxsize=256)
def allocator_defaults(kind: str | None, executable: str | None) -> tuple[Suppression, ...]:
    """The defaults of a process whose allocator is of `kind` (EXECUTABLE
    made the executable's basename)."""
    out = []
    for p, mods, top, why in ALLOCATOR_DEFAULTS.get(kind or "", ()):
        if EXECUTABLE in mods:
            if not executable:
                continue
            mods = tuple(os.path.basename(executable) if m == EXECUTABLE else m for m in mods)
        out.append(Suppression(pattern=p, source="default", top_frames=top, modules=mods, reason=why))
    return tuple(out)


def _process_matcher(p, suppressions: Sequence[Suppression], base, cache: dict):
    """The matcher of a process's stacks: with the defaults on, its
    allocator's defaults too (one matcher per distinct list, in `cache`)."""
    alloc = getattr(p, "allocator", None)
    if not alloc or not any(s.source == "default" for s in suppressions):
        return base
    extra = allocator_defaults(alloc.get("kind"), getattr(p, "exe", None))
    if not extra:
        return base
    if extra not in cache:
        cache[extra] = _Matcher(list(suppressions) + list(extra))
    return cache[extra]


# --------------------------------------------------------------------------
# Generating suppressions for the leaks that remain
# --------------------------------------------------------------------------

# Runtime libraries whose frames are never good suppression targets: naming
# malloc's wrapper (operator new, strdup) would hide every leak made through
# it, naming the interpreter's eval loop every in-process leak.
_RUNTIME = _LIBC + _LDSO + _LIBSTDCXX + ("libgcc_s.so*", "libm.so*", "libpthread.so*", "libdl.so*",
                                         "python", "python[23]*", "libpython*.so*")


def _literal(name: str) -> str:
    """A name as an exact LSan pattern ('*' in a name matches itself anyway;
    '$' can only end a pattern, so it becomes '*')."""
    core = name.replace("$", "*")
    return f"^{core}$"


# Functions on (nearly) every stack: suppressing one hides every leak.
_ENTRY_POINTS = frozenset({
    "main", "_start", "__libc_start_main", "__libc_start_call_main", "start_thread",
    "clone", "clone3", "__clone", "__clone3", "__clone_internal", "_dl_start_user",
})


def suppression_target(frames: Sequence[Mapping], exe: str | None) -> tuple[str | None, str]:
    """(pattern, what) to suppress a stack by; pattern None when there is no
    frame outside the C/C++ runtime to name (or only the program's entry
    points, or only the executable itself as a module)."""
    for f in frames:
        fn = f.get("function")
        if fn and f.get("module") and fn not in _ENTRY_POINTS and not _in_modules(f, _RUNTIME):
            pattern = _literal(fn)
            if _pattern_problem(pattern) is None:
                return pattern, f"function {fn}"
    for f in frames:
        mod = f.get("module")
        if mod and not f.get("function") and mod != exe and not _in_modules(f, _RUNTIME):
            pattern = "/" + os.path.basename(mod).replace("$", "*") + "$"
            if _pattern_problem(pattern) is None:
                return pattern, f"any stack through module {mod} (it has no function names)"
    return None, ""
