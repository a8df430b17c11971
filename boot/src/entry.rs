//! The image's first instructions: the Multiboot1 header, the Xen PVH note,
//! the two 32-bit entry points and the trampoline into 64-bit mode.
//!
//! Both loaders enter in 32-bit protected mode with paging off, interrupts
//! off and flat segments:
//! * Multiboot1 (spec 0.6.96, 3.2): EAX = 0x2BADB002, EBX = physical address
//!   of the Multiboot information structure.
//! * Xen PVH (xen/include/public/arch-x86/hvm/start_info.h, "Direct boot"):
//!   EBX = physical address of `hvm_start_info`; no stack.
//!
//! The trampoline clears .bss, identity-maps the first 4 GiB with 2 MiB pages
//! (enough to reach the loader's structures, the modules and the LAPIC), turns
//! on PAE, EFER.LME (+NXE when CPUID says NX exists) and paging, loads a
//! minimal 64-bit GDT and calls `hv_boot_main(protocol_magic, info_paddr)`
//! on the boot stack. `protocol_magic` is EAX for Multiboot and the PVH
//! start-info magic for PVH, so the Rust side knows which structure EBX
//! points to. The hypervisor later replaces GDT and page tables with its own.
//!
//! Invariants: the boot stack and the page tables live in .bss, which the
//! trampoline zeroes before it uses either; nothing here assumes the loader
//! zeroed it.

/// Size of the boot (and main hypervisor) stack.
pub const BOOT_STACK_BYTES: usize = 512 * 1024;

// Multiboot1 header with the a.out kludge (Multiboot spec 0.6.96, 3.1.1 and
// 3.1.3): flags bit 0 = page-align modules, bit 1 = memory map wanted,
// bit 16 = the address fields below are valid (QEMU's -kernel and GRUB then
// load the image as one flat range instead of parsing the 64-bit ELF).
// Left out of the `pvh-only` build so that QEMU falls back to the PVH note.
#[cfg(not(feature = "pvh-only"))]
core::arch::global_asm!(
    r#"
    .section .multiboot_header, "a"
    .balign 4
hv_multiboot_header:
    .long 0x1BADB002                    // magic
    .long 0x00010003                    // flags
    .long -(0x1BADB002 + 0x00010003)    // checksum
    .long hv_multiboot_header           // header_addr
    .long __image_start                 // load_addr
    .long __load_end                    // load_end_addr
    .long __bss_end                     // bss_end_addr
    .long hv_multiboot_entry            // entry_addr
"#
);

core::arch::global_asm!(
    r#"
    // Xen ELF note XEN_ELFNOTE_PHYS32_ENTRY (type 18): the 32-bit PVH entry
    // (xen/include/public/elfnote.h). QEMU reads the descriptor as a
    // pointer-sized value in an ELF64 image, so it is a .quad.
    .section .note.Xen, "a"
    .balign 4
    .long 4                 // namesz ("Xen\0")
    .long 8                 // descsz
    .long 18                // type: PHYS32_ENTRY
    .asciz "Xen"
    .balign 4
    .quad hv_pvh_entry

    .section .boot.text, "ax"
    .code32

    .global hv_multiboot_entry
hv_multiboot_entry:
    cli
    cld
    mov esi, eax            // Multiboot magic (checked in Rust)
    mov edi, ebx            // Multiboot information
    jmp hv_entry32

    .global hv_pvh_entry
hv_pvh_entry:
    cli
    cld
    mov esi, 0x336ec578     // XEN_HVM_START_MAGIC_VALUE: "EBX is hvm_start_info"
    mov edi, ebx
    jmp hv_entry32

hv_entry32:
    // Zero .bss (stack and page tables live there). ESI/EDI are kept.
    mov ebp, edi
    mov edi, offset __bss_start
    mov ecx, offset __bss_end
    sub ecx, edi
    shr ecx, 2
    xor eax, eax
    rep stosd
    mov edi, ebp
    mov esp, offset hv_boot_stack_top

    // Long mode and NX present? CPUID 0x80000001: EDX bit 29 = LM, bit 20 = NX
    // (AMD APM vol. 3, E.4.2; Intel SDM vol. 2A, CPUID).
    mov ebp, 0              // EFER bits to set besides LME
    mov eax, 0x80000000
    cpuid
    cmp eax, 0x80000001
    jb hv_entry32_no_long_mode
    mov eax, 0x80000001
    cpuid
    test edx, 0x20000000
    jz hv_entry32_no_long_mode
    test edx, 0x00100000
    jz 2f
    mov ebp, 0x800          // EFER.NXE
2:
    // Page tables: PML4[0] -> PDPT; PDPT[0..4] -> four page directories of
    // 2 MiB pages covering [0, 4 GiB) (AMD APM vol. 2, 5.3; Intel SDM vol. 3A,
    // 4.5). Present | writable | (PS for the leaves). Upper halves stay zero.
    mov eax, offset hv_boot_pdpt
    or eax, 0x3
    mov dword ptr [hv_boot_pml4], eax

    mov ebx, offset hv_boot_pd
    mov ecx, 0
3:
    mov eax, ebx
    or eax, 0x3
    mov dword ptr [hv_boot_pdpt + ecx * 8], eax
    add ebx, 0x1000
    inc ecx
    cmp ecx, 4
    jb 3b

    mov ecx, 0              // PD entry index over all four PDs (2048)
4:
    mov eax, ecx
    shl eax, 21
    or eax, 0x83            // present | writable | PS
    mov dword ptr [hv_boot_pd + ecx * 8], eax
    inc ecx
    cmp ecx, 2048
    jb 4b

    // CR4.PAE (bit 5).
    mov eax, cr4
    or eax, 0x20
    mov cr4, eax
    mov eax, offset hv_boot_pml4
    mov cr3, eax
    // EFER.LME (bit 8) | NXE when available (AMD APM vol. 2, 3.1.7).
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x100
    or eax, ebp
    wrmsr
    // CR0: PG (31) | WP (16) | NE (5) | PE (0). NE matters for VMXON, later in boot
    // (GRUB leaves it clear; VMX requires it, Intel SDM vol. 3C, 24.8).
    // CD (30) and NW (29) cleared: normal cache mode (Intel SDM vol. 3A,
    // "Memory Cache Control", cache operating modes table; AMD APM vol. 2,
    // 7.6.1). Bochs' BIOS hands over with both set.
    mov eax, cr0
    and eax, 0x9FFFFFFF
    or eax, 0x80010021
    mov cr0, eax

    lgdt [hv_boot_gdt_ptr]
    // Far return into the 64-bit code segment (selector 0x08).
    mov eax, 0x08
    push eax
    mov eax, offset hv_entry64
    push eax
    retf

hv_entry32_no_long_mode:
    // Nothing can be printed sensibly without a console driver here: write
    // a short note to COM1 and stop.
    mov edx, 0x3F8
    mov ebx, offset hv_no_lm_msg
5:
    mov al, byte ptr [ebx]
    test al, al
    jz 6f
    out dx, al
    inc ebx
    jmp 5b
6:
    cli
    hlt
    jmp 6b

    .code64
hv_entry64:
    mov eax, 0x10
    mov ds, eax
    mov es, eax
    mov ss, eax
    xor eax, eax
    mov fs, eax
    mov gs, eax
    mov rsp, offset hv_boot_stack_top
    // hv_boot_main(protocol_magic: u32, info_paddr: u32) -> !
    mov edx, edi
    mov edi, esi
    mov esi, edx
    call hv_boot_main
7:
    cli
    hlt
    jmp 7b

    .section .boot.rodata, "a"
    .balign 16
hv_boot_gdt:
    .quad 0                         // null
    .quad 0x00AF9A000000FFFF        // 0x08: 64-bit code, DPL 0 (L=1, D=0)
    .quad 0x00CF92000000FFFF        // 0x10: data, DPL 0
hv_boot_gdt_end:
    .balign 4
    .word 0
hv_boot_gdt_ptr:
    .word hv_boot_gdt_end - hv_boot_gdt - 1
    .long hv_boot_gdt
hv_no_lm_msg:
    .asciz "hvmigrate: CPU has no long mode; stopped\r\n"

    .section .bss.hv_boot, "aw", @nobits
    .balign 4096
hv_boot_pml4:
    .skip 4096
hv_boot_pdpt:
    .skip 4096
hv_boot_pd:
    .skip 4 * 4096
    // One unmapped guard page below the stack (see hypervisor::mem::paging):
    // an overflow faults (#PF, then #DF on its IST stack) instead of
    // silently overwriting the page tables above.
    .balign 4096
    .global hv_boot_stack_guard
hv_boot_stack_guard:
    .skip 4096
    .skip {stack_bytes}
    .global hv_boot_stack_top
hv_boot_stack_top:
"#,
    stack_bytes = const BOOT_STACK_BYTES,
);

unsafe extern "C" {
    static __image_start: u8;
    static __rodata_start: u8;
    static __data_start: u8;
    static __image_end: u8;
    static hv_boot_stack_guard: u8;
}

/// Where the image's parts lie, from the linker script and the boot stack.
pub fn image_layout() -> hypervisor::mem::paging::ImageLayout {
    // Taking the address of a linker-defined symbol reads nothing.
    hypervisor::mem::paging::ImageLayout {
        start: core::ptr::addr_of!(__image_start) as u64,
        rodata_start: core::ptr::addr_of!(__rodata_start) as u64,
        data_start: core::ptr::addr_of!(__data_start) as u64,
        end: core::ptr::addr_of!(__image_end) as u64,
        stack_guard: core::ptr::addr_of!(hv_boot_stack_guard) as u64,
    }
}
