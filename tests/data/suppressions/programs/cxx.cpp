#include <iostream>
#include <stdexcept>
#include <string>
#include <locale>
int main(){ try { throw std::runtime_error("boom"); } catch (const std::exception &e) { std::cout << e.what() << std::endl; }
  std::string s(100, 'x'); std::cout << s.size() << std::endl; std::locale l(""); return 0; }
