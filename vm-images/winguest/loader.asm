; Multiboot v1 loader of a gdbhandles test guest (flat binary, a.out kludge, loaded at 1 MiB).
;
; The guest's memory is already prepared (memory.bin, loaded by QEMU's -device loader): page
; tables, GDT/IDT/TSS, KPCRs, the kernel image. This code only brings each CPU into the state a
; running Windows kernel leaves it in. Per-guest values come from params.inc (generated):
;   KERNEL_CR3, STUB_ALIAS (kernel VA mapping the low stub page; LmTarget = its lm_final),
;   SMP (1 or 2), CPU0_* / CPU1_* (GDTR, IDTR, GDT VA, GS bases, CR3, RSP, RIP, mode), VAL_CR0, VAL_CR4, VAL_EFER.
; Steps: zero page 0, write the processor start block (low stub, 0x1000), build a temporary
; PML4 (identity for the first 2 MiB + the System PML4's kernel half), long mode, load the
; final descriptors and MSRs, jump to the kernel alias of lm_final, switch to the final CR3
; (the identity map is gone with it) and enter the kernel loop (or, on CPU 1 of `kpti`, user mode).

%include "params.inc"
%define LMTARGET (STUB_ALIAS + (lm_final - lowstub_image))

LOWSTUB   equ 0x1000
MB_MAGIC  equ 0x1BADB002
MB_FLAGS  equ 0x00010002

bits 32
org 0x100000

mb_header:
    dd MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)
    dd mb_header, mb_header, load_end, bss_end, entry

entry:
    cli
    mov esp, stack_top
    xor eax, eax                    ; physical page 0 is all zeros on Windows
    xor edi, edi
    mov ecx, 1024
    rep stosd
    mov esi, lowstub_image          ; the processor start block
    mov edi, LOWSTUB
    mov ecx, 1024
    rep movsd
    mov edi, tmp_pml4               ; temporary tables (loader bss, never part of the guest)
    xor eax, eax
    mov ecx, 3 * 1024
    rep stosd
    mov dword [tmp_pml4], tmp_pdpt + 3
    mov dword [tmp_pdpt], tmp_pd + 3
    mov dword [tmp_pd], 0x83        ; 2 MiB identity page: loader and low stub
    mov esi, KERNEL_CR3 + 256 * 8   ; kernel half of the System PML4
    mov edi, tmp_pml4 + 256 * 8
    mov ecx, 512
    rep movsd
%if SMP > 1
    mov dword [0xFEE00310], 1 << 24          ; INIT-SIPI-SIPI to APIC id 1: vector 1 = 0x1000
    mov dword [0xFEE00300], 0x00004500
    call delay
    mov dword [0xFEE00310], 1 << 24
    mov dword [0xFEE00300], 0x00004601
    call delay
    mov dword [0xFEE00310], 1 << 24
    mov dword [0xFEE00300], 0x00004601
%endif
    mov ebx, LOWSTUB + (cpu0 - lowstub_image)
    jmp LOWSTUB + (pm_to_long - lowstub_image)

%if SMP > 1
delay:
    mov ecx, 200000
.spin:
    pause
    loop .spin
    ret
%endif

align 4096, db 0xCC
lowstub_image:
; ---- processor start block: the page MemProcFS and others recognise (0x1000) ----
; 0x00: jmp rel16 to the real-mode AP entry; +4 CompletionFlag = 1; +0x70 LmTarget; +0xA0 CR3
    db 0xE9
    dw ap_real - lowstub_image - 3
    db 0
    dd 1
gdt32_ptr:                          ; +0x08: pseudo descriptor of the temporary GDT below
    dw gdt32_end - gdt32 - 1
    dd LOWSTUB + (gdt32 - lowstub_image)
    dw 0
align 16, db 0
gdt32:                              ; +0x10: null, 32-bit code 0x08, data 0x10, 64-bit code 0x18
    dq 0
    dq 0x00CF9B000000FFFF
    dq 0x00CF93000000FFFF
    dq 0x00AF9B000000FFFF
gdt32_end:
tiled_cr3:
    dq tmp_pml4                     ; temporary CR3 (identity + kernel half)
    times 0x70 - ($ - lowstub_image) db 0
    dq LMTARGET                     ; +0x70: LmTarget, the kernel-alias VA of lm_final
    times 0xA0 - ($ - lowstub_image) db 0
    dq KERNEL_CR3                   ; +0xA0: kernel CR3 (ProcessorState.SpecialRegisters.Cr3)
    times 0x100 - ($ - lowstub_image) db 0

; per-CPU parameters (offsets used by lm_setup)
P_GDTR  equ 0x00
P_IDTR  equ 0x10
P_GDT   equ 0x20
P_GS    equ 0x28
P_KGS   equ 0x30
P_CR3   equ 0x38
P_RSP   equ 0x40
P_RIP   equ 0x48
P_MODE  equ 0x50                    ; 0: kernel jump; 1: iretq to user mode through P_EXIT
P_EXIT  equ 0x58                    ; VA of a `mov cr3, rax; iretq` stub mapped in both CR3s
P_LSTAR equ 0x60
cpu0:
    dw CPU0_GDT_LIMIT
    dq CPU0_GDT
    times 6 db 0
    dw CPU0_IDT_LIMIT
    dq CPU0_IDT
    times 6 db 0
    dq CPU0_GDT, CPU0_GS, CPU0_KGS, CPU0_CR3, CPU0_RSP, CPU0_RIP, CPU0_MODE, CPU0_EXIT, LSTAR
    times 0x80 - ($ - cpu0) db 0
cpu1:
%if SMP > 1
    dw CPU1_GDT_LIMIT
    dq CPU1_GDT
    times 6 db 0
    dw CPU1_IDT_LIMIT
    dq CPU1_IDT
    times 6 db 0
    dq CPU1_GDT, CPU1_GS, CPU1_KGS, CPU1_CR3, CPU1_RSP, CPU1_RIP, CPU1_MODE, CPU1_EXIT, LSTAR
%endif
    times 0x80 - ($ - cpu1) db 0

; ---- 32-bit protected mode, paging off -> long mode with the temporary CR3 (ebx = params) ----
bits 32
pm_to_long:
    lgdt [LOWSTUB + (gdt32_ptr - lowstub_image)]
    mov eax, cr4
    or eax, 0x20                    ; PAE
    mov cr4, eax
    mov eax, [LOWSTUB + (tiled_cr3 - lowstub_image)]
    mov cr3, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, VAL_EFER
    wrmsr
    mov eax, cr0
    or eax, 0x80000001
    mov cr0, eax
    jmp 0x18:(LOWSTUB + (lm_setup - lowstub_image))

; ---- 64-bit, identity-mapped: final descriptors, segments, MSRs, control registers ----
bits 64
lm_setup:
    lgdt [rbx + P_GDTR]
    lidt [rbx + P_IDTR]
    lea rax, [rel .cs]
    push 0x10                       ; KGDT64_R0_CODE
    push rax
    retfq
.cs:
    mov ax, 0x18                    ; KGDT64_R0_DATA
    mov ss, ax
    mov ax, 0x2B                    ; KGDT64_R3_DATA | 3, as Windows keeps DS/ES/GS
    mov ds, ax
    mov es, ax
    mov gs, ax
    mov ax, 0x53                    ; KGDT64_R3_CMTEB | 3
    mov fs, ax
    mov rax, [rbx + P_GDT]          ; ltr marks the TSS busy again; the image holds it busy
    and byte [rax + 0x45], 0xFD
    mov ax, 0x40                    ; KGDT64_SYS_TSS
    ltr ax
    mov ecx, 0xC0000100             ; FS base
    xor eax, eax
    xor edx, edx
    wrmsr
    mov ecx, 0xC0000101             ; GS base
    mov eax, [rbx + P_GS]
    mov edx, [rbx + P_GS + 4]
    wrmsr
    mov ecx, 0xC0000102             ; KERNEL_GS_BASE
    mov eax, [rbx + P_KGS]
    mov edx, [rbx + P_KGS + 4]
    wrmsr
    mov ecx, 0xC0000081             ; STAR
    xor eax, eax
    mov edx, 0x00230010
    wrmsr
    mov ecx, 0xC0000082             ; LSTAR = KiSystemCall64(Shadow)
    mov eax, [rbx + P_LSTAR]
    mov edx, [rbx + P_LSTAR + 4]
    wrmsr
    mov ecx, 0xC0000084             ; SFMASK
    mov eax, 0x4700
    xor edx, edx
    wrmsr
    mov rax, VAL_CR4
    mov cr4, rax
    mov rax, VAL_CR0
    mov cr0, rax
    mov rax, LMTARGET               ; continue at the kernel alias of this page
    jmp rax

; ---- running at the kernel alias (LmTarget): drop the temporary CR3 and enter the kernel ----
align 16, db 0xCC                   ; LmTarget is a function address (low bits clear)
lm_final:
    mov rsp, [rbx + P_RSP]
    mov rcx, [rbx + P_RIP]
    mov rdx, [rbx + P_MODE]
    mov rsi, [rbx + P_EXIT]
    mov rax, [rbx + P_CR3]
    test rdx, rdx
    jnz .user
    mov cr3, rax                    ; the identity map is gone from here on
    jmp rcx
.user:                              ; iretq frame (SS, RSP, RFLAGS, CS, RIP) prepared on RSP
    jmp rsi

; ---- CPU 1: real mode at 0x1000 (SIPI vector 1) -> protected mode ----
    times 0x603 - ($ - lowstub_image) db 0xCC   ; rel16 of the jmp at +0 = 0x600, as Windows has
bits 16
ap_real:
    cli
    xor ax, ax
    mov ds, ax
    lgdt [LOWSTUB + (gdt32_ptr - lowstub_image)]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    jmp dword 0x08:(LOWSTUB + (ap_pm - lowstub_image))
bits 32
ap_pm:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov esp, ap_stack_top
    mov ebx, LOWSTUB + (cpu1 - lowstub_image)
    mov eax, LOWSTUB + (pm_to_long - lowstub_image)
    jmp eax                         ; absolute: this page runs at 0x1000, not where it was assembled

    times 0x1000 - ($ - lowstub_image) db 0xCC
lowstub_end:

load_end:
section .bss
alignb 4096
tmp_pml4:   resb 4096
tmp_pdpt:   resb 4096
tmp_pd:     resb 4096
            resb 4096
stack_top:
            resb 4096
ap_stack_top:
bss_end:
