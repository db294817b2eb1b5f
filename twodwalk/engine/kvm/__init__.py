"""KVM: memslots (GPA -> HVA), the MMU that builds EPT or shadow tables, and the VM that
ties them to a host process (Linux virt/kvm/kvm_main.c, arch/x86/kvm/mmu/)."""
