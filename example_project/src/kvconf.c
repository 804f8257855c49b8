/* libkvconf - see include/kvconf.h */
#include "kvconf.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Allocating helpers stay real frames so leak stacks name them. */
#define NOINLINE __attribute__((noinline, noclone))

static void set_error(struct kv_error *err, unsigned line, const char *fmt, ...)
{
    va_list ap;

    if (!err)
        return;
    err->line = line;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof err->message, fmt, ap);
    va_end(ap);
}

NOINLINE char *kv_strndup(const char *s, size_t n)
{
    char *p = malloc(n + 1);

    if (p) {
        memcpy(p, s, n);
        p[n] = '\0';
    }
    return p;
}

/* ---- building the tree ------------------------------------------------ */

static struct kv_section *section_new(struct kv_config *cfg, const char *name, size_t n)
{
    struct kv_section *s = calloc(1, sizeof *s);

    if (!s || !(s->name = kv_strndup(name, n))) {
        free(s);
        return NULL;
    }
    s->tail = &s->entries;
    *cfg->tail = s;
    cfg->tail = &s->next;
    if (n)
        cfg->nsections++;
    return s;
}

static struct kv_entry *entry_new(struct kv_config *cfg, struct kv_section *s,
                                  const char *key, size_t klen, char *value, unsigned line)
{
    struct kv_entry *e = calloc(1, sizeof *e);

    if (!e || !(e->key = kv_strndup(key, klen))) {
        free(e);
        return NULL;
    }
    e->value = value;
    e->line = line;
    *s->tail = e;
    s->tail = &e->next;
    s->nentries++;
    cfg->nkeys++;
    return e;
}

void kv_free(struct kv_config *cfg)
{
    struct kv_section *s, *snext;
    struct kv_entry *e, *enext;

    if (!cfg)
        return;
    for (s = cfg->sections; s; s = snext) {
        snext = s->next;
        for (e = s->entries; e; e = enext) {
            enext = e->next;
            free(e->key);
            free(e->value);
            free(e);
        }
        free(s->name);
        free(s);
    }
    free(cfg);
}

/* ---- parsing ---------------------------------------------------------- */

static const char *skip_ws(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t'))
        p++;
    return p;
}

static const char *trim_end(const char *start, const char *end)
{
    while (end > start && isspace((unsigned char)end[-1]))
        end--;
    return end;
}

static int valid_key(const char *k, size_t n)
{
    size_t i;

    for (i = 0; i < n; i++)
        if (!isalnum((unsigned char)k[i]) && k[i] != '_' && k[i] != '-')
            return 0;
    return n > 0;
}

static const struct kv_entry *find_entry(const struct kv_section *s, const char *key, size_t n)
{
    const struct kv_entry *e;

    for (e = s->entries; e; e = e->next)
        if (strlen(e->key) == n && !memcmp(e->key, key, n))
            return e;
    return NULL;
}

/* Parse the value part of "key = value" (p..end, already left-trimmed). */
static char *parse_value(const char *p, const char *end, unsigned line, struct kv_error *err)
{
    const char *c;
    char *out, *o;

    if (p < end && *p == '"') {
        if (!(out = o = malloc(end - p)))
            return NULL;
        for (p++; p < end && *p != '"'; p++) {
            if (*p == '\\' && p + 1 < end)
                p++;
            *o++ = *p;
        }
        *o = '\0';
        if (p == end) {
            set_error(err, line, "unterminated string");
            free(out);
            return NULL;
        }
        p = skip_ws(p + 1, end);
        if (p < end && *p != '#' && *p != ';') {
            set_error(err, line, "garbage after closing quote");
            free(out);
            return NULL;
        }
        return out;
    }
    /* unquoted: an inline comment starts at whitespace + '#' or ';' */
    for (c = p; c < end; c++)
        if ((*c == '#' || *c == ';') && c > p && isspace((unsigned char)c[-1]))
            break;
    return kv_strndup(p, trim_end(p, c) - p);
}

struct kv_config *kv_parse(const char *text, size_t len, struct kv_error *err)
{
    struct kv_config *cfg = calloc(1, sizeof *cfg);
    struct kv_section *cur;
    const char *line = text, *end = text + len;
    unsigned lineno = 0;

    if (err)
        err->line = 0, err->message[0] = '\0';
    if (!cfg)
        goto oom;
    cfg->tail = &cfg->sections;
    if (!(cur = section_new(cfg, "", 0)))
        goto oom;

    while (line < end) {
        const char *eol = memchr(line, '\n', end - line);
        const char *p, *q;

        if (!eol)
            eol = end;
        lineno++;
        p = skip_ws(line, eol);
        q = trim_end(p, eol);
        line = eol + 1;

        if (p == q || *p == '#' || *p == ';')
            continue;

        if (*p == '[') {
            const char *n, *ne;

            if (q[-1] != ']') {
                set_error(err, lineno, "unterminated section header");
                goto fail;
            }
            n = skip_ws(p + 1, q - 1);
            ne = trim_end(n, q - 1);
            if (n == ne) {
                set_error(err, lineno, "empty section name");
                goto fail;
            }
            for (cur = cfg->sections; cur; cur = cur->next)
                if (strlen(cur->name) == (size_t)(ne - n) && !memcmp(cur->name, n, ne - n))
                    break;
            if (cur) {
                set_error(err, lineno, "duplicate section [%.*s]", (int)(ne - n), n);
                goto fail;
            }
            if (!(cur = section_new(cfg, n, ne - n)))
                goto oom;
            continue;
        }

        {
            const char *eq = memchr(p, '=', q - p);
            const char *ke;
            const struct kv_entry *prev;
            char *value;

            if (!eq) {
                set_error(err, lineno, "expected 'key = value'");
                goto fail;
            }
            ke = trim_end(p, eq);
            if (!valid_key(p, ke - p)) {
                set_error(err, lineno, "invalid key '%.*s'", (int)(ke - p), p);
                goto fail;
            }
            if ((prev = find_entry(cur, p, ke - p))) {
                set_error(err, lineno, "duplicate key '%.*s' (first defined on line %u)",
                          (int)(ke - p), p, prev->line);
                goto fail;
            }
            if (!(value = parse_value(skip_ws(eq + 1, q), q, lineno, err)))
                goto fail_or_oom;
            if (!entry_new(cfg, cur, p, ke - p, value, lineno)) {
                free(value);
                goto oom;
            }
        }
    }
    return cfg;

fail_or_oom:
    if (err && err->line == lineno)
        goto fail;      /* parse_value reported a syntax error */
oom:
    set_error(err, lineno, "out of memory");
fail:
    kv_free(cfg);
    return NULL;
}

struct kv_config *kv_load(const char *path, struct kv_error *err)
{
    struct kv_config *cfg = NULL;
    size_t len = 0, cap = 4096;
    char *buf = malloc(cap);
    int fd = strcmp(path, "-") ? open(path, O_RDONLY | O_CLOEXEC) : STDIN_FILENO;
    ssize_t n;

    if (err)
        err->line = 0, err->message[0] = '\0';
    if (fd < 0 || !buf) {
        set_error(err, 0, "%s", fd < 0 ? strerror(errno) : "out of memory");
        goto out;
    }
    for (;;) {
        if (len == cap) {
            char *nb = realloc(buf, cap *= 2);
            if (!nb) {
                set_error(err, 0, "out of memory");
                goto out;
            }
            buf = nb;
        }
        n = read(fd, buf + len, cap - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            set_error(err, 0, "%s", strerror(errno));
            goto out;
        }
        if (n == 0)
            break;
        len += n;
    }
    cfg = kv_parse(buf, len, err);
out:
    if (fd > STDIN_FILENO)
        close(fd);
    free(buf);
    return cfg;
}

/* ---- lookup ----------------------------------------------------------- */

const struct kv_section *kv_find_section(const struct kv_config *cfg, const char *name)
{
    const struct kv_section *s;

    for (s = cfg->sections; s; s = s->next)
        if (!strcmp(s->name, name))
            return s;
    return NULL;
}

const char *kv_get(const struct kv_config *cfg, const char *section, const char *key)
{
    const struct kv_section *s = kv_find_section(cfg, section);
    const struct kv_entry *e;

    for (e = s ? s->entries : NULL; e; e = e->next)
        if (!strcmp(e->key, key))
            return e->value;
    return NULL;
}

const char *kv_get_path(const struct kv_config *cfg, const char *path)
{
    char *buf = kv_strndup(path, strlen(path));
    char *dot;
    const char *value;

    if (!buf)
        return NULL;
    dot = strrchr(buf, '.');
    if (dot) {
        *dot = '\0';
        value = kv_get(cfg, buf, dot + 1);
    } else {
        value = kv_get(cfg, "", buf);
    }
    if (!value)
        return NULL;        /* BUG (deliberate): buf leaks on a lookup miss */
    free(buf);
    return value;
}

/* ---- flat index ------------------------------------------------------- */

NOINLINE struct kv_index_entry *kv_index_entry_new(const struct kv_section *s,
                                                   const struct kv_entry *e)
{
    struct kv_index_entry *ie = malloc(sizeof *ie);
    size_t slen = strlen(s->name), klen = strlen(e->key);

    if (!ie)
        return NULL;
    ie->name = malloc(slen ? slen + 1 + klen + 1 : klen + 1);
    if (!ie->name) {
        free(ie);
        return NULL;
    }
    if (slen)
        sprintf(ie->name, "%s.%s", s->name, e->key);
    else
        memcpy(ie->name, e->key, klen + 1);
    ie->section = s->name;
    ie->key = e->key;
    ie->value = e->value;
    ie->line = e->line;
    return ie;
}

static int index_cmp(const void *a, const void *b)
{
    const struct kv_index_entry *x = *(struct kv_index_entry *const *)a;
    const struct kv_index_entry *y = *(struct kv_index_entry *const *)b;

    return strcmp(x->name, y->name);
}

NOINLINE struct kv_index *kv_index_build(const struct kv_config *cfg)
{
    struct kv_index *idx = malloc(sizeof *idx);
    const struct kv_section *s;
    const struct kv_entry *e;

    if (!idx)
        return NULL;
    idx->count = 0;
    idx->entries = calloc(cfg->nkeys ? cfg->nkeys : 1, sizeof *idx->entries);
    if (!idx->entries) {
        free(idx);
        return NULL;
    }
    for (s = cfg->sections; s; s = s->next)
        for (e = s->entries; e; e = e->next) {
            struct kv_index_entry *ie = kv_index_entry_new(s, e);
            if (!ie) {
                kv_index_free(idx);
                return NULL;
            }
            idx->entries[idx->count++] = ie;
        }
    qsort(idx->entries, idx->count, sizeof *idx->entries, index_cmp);
    return idx;
}

void kv_index_free(struct kv_index *idx)
{
    size_t i;

    if (!idx)
        return;
    for (i = 0; i < idx->count; i++) {
        free(idx->entries[i]->name);
        free(idx->entries[i]);
    }
    free(idx->entries);
    free(idx);
}

/* ---- output ----------------------------------------------------------- */

static int needs_quotes(const char *v)
{
    size_t n = strlen(v);

    return n == 0 || isspace((unsigned char)v[0]) || isspace((unsigned char)v[n - 1]) ||
           v[0] == '"' || strpbrk(v, "#;\\\"\n") != NULL;
}

static void write_value(const char *v, FILE *out)
{
    if (!needs_quotes(v)) {
        fputs(v, out);
        return;
    }
    putc('"', out);
    for (; *v; v++) {
        if (*v == '"' || *v == '\\')
            putc('\\', out);
        putc(*v, out);
    }
    putc('"', out);
}

int kv_write(const struct kv_config *cfg, FILE *out)
{
    const struct kv_section *s;
    const struct kv_entry *e;
    int first = 1;

    for (s = cfg->sections; s; s = s->next) {
        if (*s->name) {
            fprintf(out, "%s[%s]\n", first ? "" : "\n", s->name);
            first = 0;
        } else if (!s->entries) {
            continue;
        }
        for (e = s->entries; e; e = e->next) {
            fprintf(out, "%s = ", e->key);
            write_value(e->value, out);
            putc('\n', out);
            first = 0;
        }
    }
    return ferror(out) ? -1 : 0;
}

int kv_write_flat(const struct kv_config *cfg, FILE *out)
{
    struct kv_index *idx = kv_index_build(cfg);
    size_t i;

    if (!idx)
        return -1;
    for (i = 0; i < idx->count; i++) {
        fprintf(out, "%s = ", idx->entries[i]->name);
        write_value(idx->entries[i]->value, out);
        putc('\n', out);
    }
    /* BUG (deliberate): the index is never released - kv_index_free(idx) is missing. */
    return ferror(out) ? -1 : 0;
}
