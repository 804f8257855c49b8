/* Hand-written prologues for tests/test_placement.py::test_place_probes_*.
 * Assembled at test time:  gcc -shared -fPIC -nostdlib
 *     -Wl,--version-script=prologues.map prologues.S
 */
#define FUNC(name) .globl name; .type name,@function; .p2align 4; name:
#define END(name)  .size name, .-name

    .text

/* glibc-2.36-free shape: probe belongs on the je at +3 */
FUNC(pl_test_je)
.Ltest_je_0:
    test  %rdi, %rdi
    je    1f
    push  %rbx
    mov   %rdi, %rbx
    pop   %rbx
1:  ret
END(pl_test_je)

/* a second name for the same code (like aligned_alloc/memalign) */
    .globl pl_alias
    .type  pl_alias,@function
    .set   pl_alias, pl_test_je
    .size  pl_alias, 11

/* CET prologue: endbr64 is single-stepped, push rbp at +4 is emulated */
FUNC(pl_endbr_push)
    endbr64
    push  %rbp
    mov   %rsp, %rbp
    pop   %rbp
    ret
END(pl_endbr_push)

/* first instruction overwrites the argument: must stay at 0 */
FUNC(pl_writes_rdi)
    mov   (%rdi), %rdi
    push  %rbx
    pop   %rbx
    ret
END(pl_writes_rdi)

/* rdi only read: may move to the push at +3 */
FUNC(pl_mov_rax_rdi)
    mov   %rdi, %rax
    push  %rbx
    pop   %rbx
    ret
END(pl_mov_rax_rdi)

/* a later jump lands on +3 (the would-be probe): must stay at 0 */
FUNC(pl_loop_back)
    test  %rdi, %rdi
.Lloop_back_3:
    je    2f
    sub   $1, %rdi
    test  %rdi, %rdi
    jmp   .Lloop_back_3
2:  ret
END(pl_loop_back)

/* a later jump to the *entry* is fine: the skipped test runs again */
FUNC(pl_loop_entry)
.Lloop_entry_0:
    test  %rdi, %rdi
    je    2f
    sub   $1, %rdi
    jmp   .Lloop_entry_0
2:  ret
END(pl_loop_entry)

/* stack adjustment first: kept at 0 by default (preserve_stack) */
FUNC(pl_sub_rsp)
    sub   $0x18, %rsp
    push  %rbx
    pop   %rbx
    add   $0x18, %rsp
    ret
END(pl_sub_rsp)

/* versioned symbol: pl_ver@VERS_1 (old, push first) and pl_ver@@VERS_2
 * (default, test/je).  place_probes must pick the default version. */
FUNC(pl_ver_v1)
    push  %rbx
    pop   %rbx
    ret
END(pl_ver_v1)
FUNC(pl_ver_v2)
    test  %rdi, %rdi
    je    1f
    nop
1:  ret
END(pl_ver_v2)
    .symver pl_ver_v1, pl_ver@VERS_1
    .symver pl_ver_v2, pl_ver@@VERS_2

/* an IFUNC: st_value is the resolver, so it must not be placed */
FUNC(pl_ifunc_resolver)
    lea   .Ltest_je_0(%rip), %rax
    ret
END(pl_ifunc_resolver)
    .globl pl_ifunc
    .type  pl_ifunc, @gnu_indirect_function
    .set   pl_ifunc, pl_ifunc_resolver

    .section .note.GNU-stack,"",@progbits
