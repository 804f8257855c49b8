/* Shared library used by tests/test_symbolize.py.  Lines tagged LINE:<name>
 * are looked up by the tests; keep each tag on the line of its statement. */
#include <stdlib.h>
#include <string.h>

/* static: present in .symtab only, not in .dynsym */
static char *kv_dup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *p = malloc(n); /* LINE:kv_dup_malloc */
    if (p)
        memcpy(p, s, n);
    return p;
}

char *kv_index_build(const char *key)
{
    char *copy = kv_dup(key); /* LINE:kv_index_build_call */
    return copy;
}

/* In its own section, so that the compile unit has several address ranges
 * (DW_AT_ranges: .debug_rnglists in DWARF 5, .debug_ranges in DWARF 4). */
__attribute__((noinline, section(".text.kvcold"))) int kv_cold_path(int x)
{
    return x * 5 + 2; /* LINE:kv_cold_body */
}

int kv_exported_helper(int x)
{
    return x * 3 + kv_cold_path(x); /* LINE:kv_helper_body */
}

/* A local function with a global alias at the same address: symbolization
 * must prefer the global name. */
static int kv_impl(int x)
{
    return x - 1;
}
extern int __kv_alias_public(int x) __attribute__((alias("kv_impl")));
