// C++ shared library used by tests/test_symbolize.py (demangling).
namespace kv {
struct Table {
    int insert(int key);
};

__attribute__((noinline)) int Table::insert(int key)
{
    return key * 7; // LINE:cxx_insert_body
}
}  // namespace kv

extern "C" int kv_cxx_entry(int k)
{
    kv::Table t;
    return t.insert(k);
}
