//! The entry point. The VMM enters `_start` in 64-bit mode with paging on
//! (at least the first GiB identity mapped), interrupts off and RSI = the
//! physical address of `boot_params`. `_start` switches to the BSP stack
//! (not zeroed: stacks need no zeroing), zeroes `.bss` with `rep stosq`
//! (the loader copies only `p_filesz` bytes) and calls `bsp_main`.

use core::arch::global_asm;

global_asm!(
    r#"
    .section .text.entry, "ax"
    .code64
    .global _start
_start:
    cli
    cld
    movq %rsi, %rbx
    leaq __bsp_stack_top(%rip), %rsp
    leaq __bss_start(%rip), %rdi
    leaq __bss_end(%rip), %rcx
    subq %rdi, %rcx
    shrq $3, %rcx
    xorl %eax, %eax
    rep stosq
    movq %rbx, %rdi
    call bsp_main
2:
    cli
    hlt
    jmp 2b
    "#,
    options(att_syntax)
);
