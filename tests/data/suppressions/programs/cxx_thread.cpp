#include <thread>
#include <iostream>
thread_local std::string tls = "abc";
int main(){ std::thread t([]{ tls += "d"; }); t.join(); std::cout << tls << "\n"; return 0; }
