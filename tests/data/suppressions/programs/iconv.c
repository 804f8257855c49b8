#include <stdio.h>
#include <iconv.h>
int main(void){
  iconv_t c = iconv_open("ISO-8859-15", "UTF-8");
  char in[] = "abc", out[16]; char *ip = in, *op = out; size_t il = 3, ol = 16;
  iconv(c, &ip, &il, &op, &ol); iconv_close(c);
  c = iconv_open("UTF-16", "UTF-8"); iconv_close(c);
  return 0; }
