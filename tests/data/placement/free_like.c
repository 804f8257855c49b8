/* Compiled at test time with gcc -O2 -shared -fPIC (with and without
 * -fcf-protection).  gcc 12 emits "test rdi,rdi; je" (+ endbr64 with CET),
 * the same shape as glibc 2.36's free(). */
extern void real_free(void *);

void my_free(void *p)
{
    if (p == 0)
        return;
    real_free(p);
}
