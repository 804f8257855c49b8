/* A small process for the leak-kinds benchmark (bench/kinds.py): it exits
 * holding two blocks, one still reachable (a global points to it) and one
 * lost, so the plugin pauses and scans it at exit when leak kinds are on. */
#include <stdlib.h>
#include <string.h>

void *kept;

int main(void) {
    kept = malloc(64);
    char *lost = malloc(32);
    memset(lost, 1, 32);
    __asm__ volatile("" : : "r"(lost) : "memory");
    return 0;
}
