/* Executable used by tests/test_symbolize.py.  Lines tagged LINE:<name> are
 * looked up by the tests; keep each tag on the line of its statement. */
#include <stdio.h>
#include <stdlib.h>

extern char *kv_index_build(const char *key);
extern int kv_exported_helper(int x);

/* Ends with a call to a noreturn function: its return address is the first
 * byte of the next function (after_fatal), which must still be attributed to
 * fatal_error when symbolizing a return address. */
__attribute__((noinline)) void fatal_error(int code)
{
    if (code > 100)
        exit(code);
    abort(); /* LINE:fatal_abort */
}

__attribute__((noinline)) int after_fatal(int x)
{
    return x + 1; /* LINE:after_fatal_body */
}

__attribute__((noinline)) char *make_entry(const char *key)
{
    char *e = kv_index_build(key); /* LINE:make_entry_call */
    return e;
}

int main(int argc, char **argv)
{
    char *e = make_entry(argc > 1 ? argv[1] : "k"); /* LINE:main_call */
    if (!e)
        fatal_error(argc); /* LINE:main_fatal */
    printf("%s %d %d\n", e, after_fatal(argc), kv_exported_helper(argc));
    free(e);
    return 0;
}
