# The QEMU comparison guest of `qemu-runner bench migrate`
# (qemu-runner/src/bench_migrate.rs embeds the assembled bytes as
# QEMU_GUEST; its test rebuilds them from this file when binutils is
# installed and compares):
#   as --32 -o g.o bench_migrate_guest.S
#   ld -m elf_i386 -Ttext=0x100000 --oformat binary -o g.bin g.o
#
# A Multiboot1 kernel (a.out kludge: QEMU's -kernel loads it at 1 MiB and
# enters it in 32-bit protected mode, paging off). It prints "heartbeat N"
# on COM1 whenever `period` TSC ticks passed since the last one (QEMU's TCG
# reads the host's TSC; the runner measures its rate and patches the
# period: 10 ms for the busy guest, 1 s for the idle one, as our guests
# busy-verify and heartbeat do). When `busy` is non-zero it increments one
# byte in every 4 KiB page of 16 MiB at 4 MiB, sweep after sweep, and looks
# at the TSC every 64 pages: busy-verify's workload.
        .code32
        .globl _start
        .set BASE, 0x100000
        .set BUF, 0x400000
        .set BUF_END, 0x1400000
_start:
        .long 0x1BADB002
        .long 0x00010003
        .long -(0x1BADB002 + 0x00010003)
        .long BASE
        .long BASE
        .long 0
        .long 0
        .long BASE + (entry - _start)
busy:   .byte 1                          # offset 32, patched
        .byte 0, 0, 0
period: .long 30000000, 0                # offset 36, u64, patched
entry:
        cli
        mov $0x90000, %esp
        xor %ebx, %ebx
        mov $BUF, %edi
        rdtsc
        mov %eax, %esi
        mov %edx, %ebp
main:
        mov $64, %ecx
        cmpb $0, BASE + (busy - _start)
        je  tick
pages:
        incb (%edi)
        add $4096, %edi
        cmp $BUF_END, %edi
        jb  1f
        mov $BUF, %edi
1:      loop pages
tick:
        rdtsc
        push %eax
        push %edx
        sub %esi, %eax
        sbb %ebp, %edx
        cmp BASE + (period - _start) + 4, %edx
        ja  beat
        jb  wait
        cmp BASE + (period - _start), %eax
        jae beat
wait:   pop %edx
        pop %eax
        jmp main
beat:   pop %ebp
        pop %esi
        inc %ebx
        mov $BASE + (text - _start), %ecx
2:      movb (%ecx), %al
        test %al, %al
        jz  3f
        call putc
        inc %ecx
        jmp 2b
3:      mov %ebx, %eax
        mov $10, %ecx
        push $0x0a
4:      xor %edx, %edx
        div %ecx
        add $0x30, %dl
        push %edx
        test %eax, %eax
        jnz 4b
5:      pop %eax
        call putc
        cmp $0x0a, %al
        jne 5b
        jmp main
putc:
        push %edx
        push %eax
        mov $0x3fd, %dx
6:      in  %dx, %al
        test $0x20, %al
        jz  6b
        pop %eax
        mov $0x3f8, %dx
        out %al, %dx
        pop %edx
        ret
text:   .asciz "heartbeat "
