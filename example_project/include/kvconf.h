/* libkvconf - a tiny INI / key=value configuration parser.
 *
 *   # comment            ; comment
 *   name = harbor          <- global key (section "")
 *   [server]
 *   port = 8080
 *   banner = "quoted # value with \"escapes\""
 *
 * Section names may contain dots ("[db.replica]"); keys may not, so the
 * dotted path "db.replica.host" is split at its last dot.
 */
#ifndef KVCONF_H
#define KVCONF_H

#include <stddef.h>
#include <stdio.h>

#define KVCONF_VERSION "1.2.0"

struct kv_entry {
    char *key;
    char *value;
    unsigned line;
    struct kv_entry *next;
};

struct kv_section {
    char *name;                 /* "" for the global section */
    struct kv_entry *entries;   /* in file order */
    struct kv_entry **tail;
    size_t nentries;
    struct kv_section *next;
};

struct kv_config {
    struct kv_section *sections; /* in file order; the global one first */
    struct kv_section **tail;
    size_t nsections;            /* not counting an empty global section */
    size_t nkeys;
};

struct kv_error {
    unsigned line;               /* 0 for I/O errors */
    char message[160];
};

/* Parsing / loading.  Both return NULL and fill *err on failure. */
struct kv_config *kv_parse(const char *text, size_t len, struct kv_error *err);
struct kv_config *kv_load(const char *path, struct kv_error *err); /* "-" = stdin */
void kv_free(struct kv_config *cfg);

/* Lookup. */
const struct kv_section *kv_find_section(const struct kv_config *cfg, const char *name);
const char *kv_get(const struct kv_config *cfg, const char *section, const char *key);
const char *kv_get_path(const struct kv_config *cfg, const char *path); /* "section.key" */

/* Sorted, flattened view: one entry per key, named "section.key". */
struct kv_index_entry {
    char *name;
    const char *section;
    const char *key;
    const char *value;
    unsigned line;
};

struct kv_index {
    size_t count;
    struct kv_index_entry **entries;
};

struct kv_index *kv_index_build(const struct kv_config *cfg);
struct kv_index_entry *kv_index_entry_new(const struct kv_section *s, const struct kv_entry *e);
void kv_index_free(struct kv_index *idx);

/* Utility: malloc'd copy of s[0..n) plus a terminating NUL. */
char *kv_strndup(const char *s, size_t n);

/* Output. */
int kv_write(const struct kv_config *cfg, FILE *out);      /* canonical INI */
int kv_write_flat(const struct kv_config *cfg, FILE *out); /* sorted "a.b = v" */

#endif
