#include <stdio.h>
#include <wchar.h>
#include <locale.h>
int main(void){ setlocale(LC_ALL, "C.UTF-8"); wprintf(L"h\u00e9llo %d\n", 3); return 0; }
