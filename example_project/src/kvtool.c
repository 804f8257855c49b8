/* kvtool - query, normalise and validate kvconf files.
 *
 *   kvtool get FILE SECTION.KEY     print one value (exit 1 if missing)
 *   kvtool dump [--flat] FILE       print the file in canonical form
 *                                   (--flat: sorted "section.key = value")
 *   kvtool check FILE...            validate files ("-" reads stdin)
 */
#include "kvconf.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

/* Keep subcommands as separate frames in native stack traces. */
#define NOINLINE __attribute__((noinline))

/* glibc would malloc stdout's buffer on first use and never free it;
 * a static buffer keeps the process at exactly 0 bytes in use at exit. */
static char outbuf[BUFSIZ];

static int usage(void)
{
    fputs("usage: kvtool get FILE SECTION.KEY\n"
          "       kvtool dump [--flat] FILE\n"
          "       kvtool check FILE...\n"
          "       kvtool --version\n", stderr);
    return 2;
}

NOINLINE static struct kv_config *load_or_complain(const char *path)
{
    struct kv_error err;
    struct kv_config *cfg = kv_load(path, &err);

    if (!cfg) {
        const char *name = strcmp(path, "-") ? path : "<stdin>";
        if (err.line)
            fprintf(stderr, "%s:%u: error: %s\n", name, err.line, err.message);
        else
            fprintf(stderr, "kvtool: %s: %s\n", name, err.message);
    }
    return cfg;
}

NOINLINE static int cmd_get(int argc, char **argv)
{
    struct kv_config *cfg;
    const char *value;

    if (argc != 2)
        return usage();
    if (!(cfg = load_or_complain(argv[0])))
        return 1;
    value = kv_get_path(cfg, argv[1]);
    if (value)
        printf("%s\n", value);
    else
        fprintf(stderr, "kvtool: %s: no such key\n", argv[1]);
    kv_free(cfg);
    return value ? 0 : 1;
}

NOINLINE static int cmd_dump(int argc, char **argv)
{
    struct kv_config *cfg;
    int flat = 0, rc;

    if (argc == 2 && !strcmp(argv[0], "--flat"))
        flat = 1, argc--, argv++;
    if (argc != 1)
        return usage();
    if (!(cfg = load_or_complain(argv[0])))
        return 1;
    rc = flat ? kv_write_flat(cfg, stdout) : kv_write(cfg, stdout);
    kv_free(cfg);
    return rc ? 1 : 0;
}

NOINLINE static int cmd_check(int argc, char **argv)
{
    int i, bad = 0;

    if (argc < 1)
        return usage();
    for (i = 0; i < argc; i++) {
        struct kv_config *cfg = load_or_complain(argv[i]);

        if (!cfg) {
            bad++;
            continue;
        }
        printf("%s: ok (%zu sections, %zu keys)\n",
               strcmp(argv[i], "-") ? argv[i] : "<stdin>", cfg->nsections, cfg->nkeys);
        kv_free(cfg);
    }
    return bad ? 1 : 0;
}

int main(int argc, char **argv)
{
    int rc;

    setvbuf(stdout, outbuf, isatty(STDOUT_FILENO) ? _IOLBF : _IOFBF, sizeof outbuf);
    if (argc < 2)
        return usage();
    if (!strcmp(argv[1], "--version")) {
        printf("kvtool %s\n", KVCONF_VERSION);
        return 0;
    }
    if (!strcmp(argv[1], "get"))
        rc = cmd_get(argc - 2, argv + 2);
    else if (!strcmp(argv[1], "dump"))
        rc = cmd_dump(argc - 2, argv + 2);
    else if (!strcmp(argv[1], "check"))
        rc = cmd_check(argc - 2, argv + 2);
    else
        rc = usage();
    if (fflush(stdout) != 0) {
        perror("kvtool: write error");
        rc = 1;
    }
    return rc;
}
