#include <stdio.h>
int main(void){ puts("hello"); fputs("x\n", stderr); char b[64]; if (fgets(b, sizeof b, stdin)) {} return 0; }
