#include <string>
#include <vector>
#include <cxxabi.h>
#include <typeinfo>
#include <cstdlib>
struct Node { std::string name; std::vector<int> v; };
__attribute__((noinline)) Node *make_node(){ auto *n = new Node{std::string(64, 'x'), {1,2,3}}; return n; }
int main(){ make_node(); int st; char *d = abi::__cxa_demangle(typeid(Node).name(), 0, 0, &st); (void)d; return 0; }
