"""twodwalk: x86-64 address translation under Linux KVM, in both dimensions, bit for bit.

    GVA -> [guest page tables] -> GPA -> [KVM memslots] -> HVA -> [host page tables] -> HPA
    GVA -> [guest page tables] -> GPA -> [EPT, filled in by KVM on EPT violations] -> HPA

The engine keeps every paging structure as real 8-byte entries in one simulated physical memory
and walks them with one generic walker; views and widgets only read what the engine records.
"""

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from twodwalk.cpuid import CpuModel
from twodwalk.ept import Eptp, ept_violation_qualification
from twodwalk.errors import AddressError, TwodwalkError
from twodwalk.formats import (
    DecodedEntry,
    EntryFormat,
    EptFormat,
    Ia32eFormat,
    Rights,
    ept_format,
    ia32e_format,
)
from twodwalk.kvm.memslots import KvmError
from twodwalk.kvm.run import InternalError, MmioExit
from twodwalk.machine import Machine
from twodwalk.memory import FrameAllocator, PhysicalMemory
from twodwalk.pagetables import PageTables
from twodwalk.paging import (
    GeneralProtection,
    PageFault,
    PagingControls,
    X86AccessRules,
    decode_cr3,
    exception_for,
    translate,
)
from twodwalk.processor import AccessResult, Processor
from twodwalk.tables import PhysicalTables
from twodwalk.tlb import Tlb, TranslationCaches, TwoLevelTlb
from twodwalk.units import PAGE_SIZE
from twodwalk.vcpu import Vcpu
from twodwalk.walker import (
    Access,
    AccessKind,
    FaultKind,
    Translation,
    WalkFault,
    WalkRecord,
    WalkStart,
    WalkStep,
    walk,
)

if TYPE_CHECKING:
    from twodwalk import widgets as widgets  # loaded on first use: see __getattr__

__all__ = [
    "PAGE_SIZE",
    "Access",
    "AccessKind",
    "AccessResult",
    "AddressError",
    "CpuModel",
    "DecodedEntry",
    "EntryFormat",
    "EptFormat",
    "Eptp",
    "FaultKind",
    "FrameAllocator",
    "GeneralProtection",
    "Ia32eFormat",
    "InternalError",
    "KvmError",
    "Machine",
    "MmioExit",
    "PageFault",
    "PageTables",
    "PagingControls",
    "PhysicalMemory",
    "PhysicalTables",
    "Processor",
    "Rights",
    "Tlb",
    "Translation",
    "TranslationCaches",
    "TwoLevelTlb",
    "TwodwalkError",
    "Vcpu",
    "WalkFault",
    "WalkRecord",
    "WalkStart",
    "WalkStep",
    "X86AccessRules",
    "decode_cr3",
    "ept_format",
    "ept_violation_qualification",
    "exception_for",
    "ia32e_format",
    "translate",
    "walk",
]


def __getattr__(name: str) -> ModuleType:
    """`tw.widgets` on first use: importing ipywidgets costs more than the whole engine, so
    `import twodwalk` does not (PEP 562 module __getattr__)."""
    if name == "widgets":
        return importlib.import_module("twodwalk.widgets")
    raise AttributeError(f"module 'twodwalk' has no attribute {name!r}")
