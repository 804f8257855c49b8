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

int kv_exported_helper(int x)
{
    return x * 3 + 1; /* LINE:kv_helper_body */
}

/* A local function with a global alias at the same address: symbolization
 * must prefer the global name. */
static int kv_impl(int x)
{
    return x - 1;
}
extern int __kv_alias_public(int x) __attribute__((alias("kv_impl")));
