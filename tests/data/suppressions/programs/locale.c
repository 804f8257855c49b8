#include <stdio.h>
#include <locale.h>
#include <string.h>
#include <langinfo.h>
#include <libintl.h>
#include <errno.h>
int main(void){
  setlocale(LC_ALL, "C.UTF-8");
  bindtextdomain("coreutils", "/usr/share/locale");
  textdomain("coreutils");
  printf("%s %s %s\n", nl_langinfo(CODESET), strerror(ENOENT), gettext("invalid option"));
  return 0; }
