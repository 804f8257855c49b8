/*
 * kvext -- a small CPython extension module, companion to libkvconf.
 *
 * It exists to demo the in-process leak checking of pytest-memleak-ebpf
 * (`pytest --ebpf-leaks`): allocations the pytest process itself makes
 * during a test's call phase, through a C extension, and still holds at the
 * end of the test.  One function is clean, two leak on purpose, and one keeps
 * a first-call cache:
 *
 *   parse_pairs(s)     clean: "a=1;b=2" -> {"a": "1", "b": "2"}
 *   leaky_copy(s)      leaks 1 malloc block of 256 bytes per call
 *   leaky_tuple(n)     leaks n bytes objects (missing Py_DECREF) per call:
 *                      n blocks of 133 bytes with PYTHONMALLOC=malloc
 *   cached_lookup(key) clean, but the first call in a process mallocs a
 *                      lookup table of 512 bytes (1 block) kept forever
 *
 * Exact figures (CPython 3.11, x86-64, glibc; see ../README.md for how they
 * were verified with valgrind).  Self-contained: only Python.h and libc.
 *
 * Built by `make ext` (or `make`) into build/kvext<EXT_SUFFIX> with
 * -O1 -g -fno-omit-frame-pointer, so native stacks unwind by frame pointers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------ */
/* parse_pairs(s) -- clean                                                   */
/* ------------------------------------------------------------------------ */

/* Strip ASCII blanks from both ends of [*b, *e). */
static void
trim(const char **b, const char **e)
{
    while (*b < *e && (**b == ' ' || **b == '\t'))
        (*b)++;
    while (*e > *b && ((*e)[-1] == ' ' || (*e)[-1] == '\t'))
        (*e)--;
}

PyDoc_STRVAR(parse_pairs_doc,
"parse_pairs(s: str) -> dict[str, str]\n"
"\n"
"Parse \"key=value\" pairs separated by ';' into a new dict, e.g.\n"
"parse_pairs(\"a=1; b = two\") == {\"a\": \"1\", \"b\": \"two\"}.  Blanks around\n"
"keys and values are stripped, empty items (\"a=1;;\") are skipped, a later\n"
"duplicate key wins.  Raises ValueError for an item without '=' or with an\n"
"empty key.\n"
"\n"
"Clean: every object it creates is either owned by the returned dict or\n"
"released before it returns; nothing is left behind.");

static PyObject *
kvext_parse_pairs(PyObject *self, PyObject *args)
{
    const char *s;
    Py_ssize_t len;
    (void)self;
    if (!PyArg_ParseTuple(args, "s#:parse_pairs", &s, &len))
        return NULL;

    PyObject *dict = PyDict_New();
    if (dict == NULL)
        return NULL;

    const char *end = s + len;
    const char *item = s;
    while (item < end) {
        const char *item_end = memchr(item, ';', (size_t)(end - item));
        if (item_end == NULL)
            item_end = end;
        const char *kb = item, *ke = item_end;
        trim(&kb, &ke);
        if (kb < ke) {                              /* skip empty items */
            const char *eq = memchr(kb, '=', (size_t)(ke - kb));
            if (eq == NULL) {
                PyObject *bad = PyUnicode_DecodeUTF8(kb, ke - kb, "replace");
                if (bad != NULL) {
                    PyErr_Format(PyExc_ValueError, "parse_pairs: missing '=' in item %R", bad);
                    Py_DECREF(bad);
                }
                goto error;
            }
            const char *vb = eq + 1, *ve = ke;
            ke = eq;
            trim(&kb, &ke);
            trim(&vb, &ve);
            if (kb == ke) {
                PyErr_SetString(PyExc_ValueError, "parse_pairs: empty key");
                goto error;
            }
            PyObject *key = PyUnicode_DecodeUTF8(kb, ke - kb, "strict");
            if (key == NULL)
                goto error;
            PyObject *value = PyUnicode_DecodeUTF8(vb, ve - vb, "strict");
            if (value == NULL) {
                Py_DECREF(key);
                goto error;
            }
            /* PyDict_SetItem does NOT steal: the dict takes its own
               references, so ours must be dropped. */
            int rc = PyDict_SetItem(dict, key, value);
            Py_DECREF(key);
            Py_DECREF(value);
            if (rc < 0)
                goto error;
        }
        item = item_end + 1;
    }
    return dict;

error:
    Py_DECREF(dict);
    return NULL;
}

/* ------------------------------------------------------------------------ */
/* leaky_copy(s) -- leaks raw malloc                                         */
/* ------------------------------------------------------------------------ */

#define COPY_BUFFER_SIZE 256

PyDoc_STRVAR(leaky_copy_doc,
"leaky_copy(s: str) -> str\n"
"\n"
"Return a copy of s, made through a fixed-size C buffer: s is truncated\n"
"to its first 255 UTF-8 bytes (only use ASCII if you truncate).\n"
"\n"
"LEAKS on purpose: the buffer is malloc(256) and is never freed --\n"
"exactly 1 block of 256 bytes per call, allocated by leaky_copy() itself\n"
"(stack: malloc <- kvext_leaky_copy).");

static PyObject *
kvext_leaky_copy(PyObject *self, PyObject *args)
{
    const char *s;
    Py_ssize_t len;
    (void)self;
    if (!PyArg_ParseTuple(args, "s#:leaky_copy", &s, &len))
        return NULL;

    char *buf = malloc(COPY_BUFFER_SIZE);
    if (buf == NULL)
        return PyErr_NoMemory();
    if (len > COPY_BUFFER_SIZE - 1)
        len = COPY_BUFFER_SIZE - 1;
    memcpy(buf, s, (size_t)len);
    buf[len] = '\0';

    /* BUG (deliberate): free(buf) is missing. */
    return PyUnicode_DecodeUTF8(buf, len, "replace");
}

/* ------------------------------------------------------------------------ */
/* leaky_tuple(n) -- leaks Python objects through a missing Py_DECREF       */
/* ------------------------------------------------------------------------ */

#define RECORD_SIZE 100

PyDoc_STRVAR(leaky_tuple_doc,
"leaky_tuple(n: int) -> tuple[bytes, ...]\n"
"\n"
"Return a tuple of n new 100-byte records; record i is bytes([i % 256]) * 100.\n"
"\n"
"LEAKS on purpose: PyTuple_SET_ITEM steals the reference to each record,\n"
"but the code Py_INCREFs each record first as if it did not.  Every record\n"
"therefore keeps one reference that nobody owns and outlives the tuple:\n"
"n bytes objects leak per call.  The tuple itself is freed normally.\n"
"\n"
"Each record is one allocation of offsetof(PyBytesObject, ob_sval) + 100 + 1\n"
"= 32 + 101 = 133 bytes; with PYTHONMALLOC=malloc (as under\n"
"`pytest --ebpf-leaks`) that is 1 malloc block, so a call leaks exactly\n"
"n blocks / 133*n bytes (stack: malloc <- ... <- PyBytes_FromStringAndSize\n"
"<- kvext_leaky_tuple).");

static PyObject *
kvext_leaky_tuple(PyObject *self, PyObject *args)
{
    Py_ssize_t n;
    (void)self;
    if (!PyArg_ParseTuple(args, "n:leaky_tuple", &n))
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "leaky_tuple: n must be >= 0");
        return NULL;
    }

    PyObject *tuple = PyTuple_New(n);
    if (tuple == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *record = PyBytes_FromStringAndSize(NULL, RECORD_SIZE);
        if (record == NULL) {
            Py_DECREF(tuple);
            return NULL;
        }
        memset(PyBytes_AS_STRING(record), (int)(i % 256), RECORD_SIZE);
        /* BUG (deliberate): PyTuple_SET_ITEM steals this reference; the extra
           Py_INCREF is never balanced, so the record can never be freed. */
        Py_INCREF(record);
        PyTuple_SET_ITEM(tuple, i, record);
    }
    return tuple;
}

/* ------------------------------------------------------------------------ */
/* cached_lookup(key) -- clean, with a first-call cache                      */
/* ------------------------------------------------------------------------ */

/* Well-known service ports, hashed into a malloc'd open-addressing table on
   the first call.  The table lives until the process exits. */
static const struct { const char *name; long port; } services[] = {
    {"ftp", 21},    {"ssh", 22},      {"smtp", 25},       {"dns", 53},
    {"http", 80},   {"pop3", 110},    {"imap", 143},      {"https", 443},
    {"imaps", 993}, {"mysql", 3306},  {"postgres", 5432}, {"redis", 6379},
    {"http-alt", 8080}, {"memcached", 11211},
};

#define TABLE_SLOTS 32          /* power of two, > 2 * number of services */

struct slot {
    const char *name;           /* points into services[]: no allocation */
    long port;
};                              /* 16 bytes: the table is 32 * 16 = 512 B */

static struct slot *table;      /* allocated on the first call, never freed */

static size_t
hash_name(const char *s, size_t len)
{
    size_t h = 5381;            /* djb2 */
    for (size_t i = 0; i < len; i++)
        h = h * 33 + (unsigned char)s[i];
    return h;
}

static int
build_table(void)
{
    table = calloc(TABLE_SLOTS, sizeof *table);
    if (table == NULL)
        return -1;
    for (size_t i = 0; i < sizeof services / sizeof services[0]; i++) {
        const char *name = services[i].name;
        size_t h = hash_name(name, strlen(name)) & (TABLE_SLOTS - 1);
        while (table[h].name != NULL)
            h = (h + 1) & (TABLE_SLOTS - 1);
        table[h].name = name;
        table[h].port = services[i].port;
    }
    return 0;
}

PyDoc_STRVAR(cached_lookup_doc,
"cached_lookup(key: str) -> int | None\n"
"\n"
"Return the well-known port of a service name (\"http\" -> 80,\n"
"\"postgres\" -> 5432, ...), or None for an unknown name.\n"
"\n"
"Clean, but with a first-call cache: the first call in a process builds a\n"
"lookup table with calloc(32, 16) -- 1 block of 512 bytes -- and keeps it\n"
"forever in a static pointer.  Later calls allocate nothing that outlives\n"
"them.  A leak checker sees the 512 bytes in whichever test calls it first;\n"
"check such code with a budget or in growth mode (warmup).");

static PyObject *
kvext_cached_lookup(PyObject *self, PyObject *args)
{
    const char *key;
    Py_ssize_t len;
    (void)self;
    if (!PyArg_ParseTuple(args, "s#:cached_lookup", &key, &len))
        return NULL;
    if (table == NULL && build_table() < 0)
        return PyErr_NoMemory();

    size_t h = hash_name(key, (size_t)len) & (TABLE_SLOTS - 1);
    while (table[h].name != NULL) {
        if (strlen(table[h].name) == (size_t)len && memcmp(table[h].name, key, (size_t)len) == 0)
            return PyLong_FromLong(table[h].port);
        h = (h + 1) & (TABLE_SLOTS - 1);
    }
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------ */
/* module                                                                    */
/* ------------------------------------------------------------------------ */

static PyMethodDef kvext_methods[] = {
    {"parse_pairs", kvext_parse_pairs, METH_VARARGS, parse_pairs_doc},
    {"leaky_copy", kvext_leaky_copy, METH_VARARGS, leaky_copy_doc},
    {"leaky_tuple", kvext_leaky_tuple, METH_VARARGS, leaky_tuple_doc},
    {"cached_lookup", kvext_cached_lookup, METH_VARARGS, cached_lookup_doc},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(kvext_doc,
"Companion extension of libkvconf, for the pytest-memleak-ebpf demo.\n"
"\n"
"parse_pairs is clean; leaky_copy (1 block of 256 B per call) and\n"
"leaky_tuple (n blocks of 133 B per call with PYTHONMALLOC=malloc) leak on\n"
"purpose; cached_lookup allocates a 512-byte table once per process.");

static struct PyModuleDef kvext_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "kvext",
    .m_doc = kvext_doc,
    .m_size = -1,
    .m_methods = kvext_methods,
};

PyMODINIT_FUNC
PyInit_kvext(void)
{
    PyObject *m = PyModule_Create(&kvext_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "COPY_BUFFER_SIZE", COPY_BUFFER_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "RECORD_SIZE", RECORD_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "TABLE_BYTES", TABLE_SLOTS * sizeof(struct slot)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
