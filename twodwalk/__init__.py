"""twodwalk: x86-64 address translation under Linux KVM, in both dimensions, bit for bit.

    GVA -> [guest page tables] -> GPA -> [KVM memslots] -> HVA -> [host page tables] -> HPA
    GVA -> [guest page tables] -> GPA -> [EPT, filled in by KVM on EPT violations] -> HPA

The engine keeps every paging structure as real 8-byte entries in one simulated physical memory
and walks them with one generic walker; views and widgets only read what the engine records.
"""

import importlib
import pkgutil
import sys
from types import ModuleType
from typing import TYPE_CHECKING

from twodwalk import engine
from twodwalk.engine.cpuid import CpuModel
from twodwalk.engine.ept import Eptp, ept_violation_qualification
from twodwalk.engine.formats import (
    DecodedEntry,
    EntryFormat,
    EptFormat,
    Ia32eFormat,
    Rights,
    ept_format,
    ia32e_format,
)
from twodwalk.engine.kvm.memslots import KvmError
from twodwalk.engine.kvm.run import InternalError, MmioExit
from twodwalk.engine.machine import Machine
from twodwalk.engine.memory import FrameAllocator, PhysicalMemory
from twodwalk.engine.nested import NestedMachine
from twodwalk.engine.pagetables import PageTables
from twodwalk.engine.paging import (
    GeneralProtection,
    PageFault,
    PagingControls,
    X86AccessRules,
    decode_cr3,
    exception_for,
    translate,
)
from twodwalk.engine.processor import AccessResult, Processor
from twodwalk.engine.tables import PhysicalTables
from twodwalk.engine.tlb import Tlb, TranslationCaches, TwoLevelTlb
from twodwalk.engine.units import PAGE_SIZE
from twodwalk.engine.vcpu import Vcpu
from twodwalk.engine.walker import (
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
from twodwalk.errors import AddressError, TwodwalkError

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
    "NestedMachine",
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


def _keep_flat_module_paths() -> None:
    """`from twodwalk.host import swp_offset`, `from twodwalk.kvm.memslots import ...`: the
    engine's modules stay importable where notebooks and users import them, from the flat
    layout before the engine had its own folder. Each old path is the same module object as
    the new one (`twodwalk.host is twodwalk.engine.host`), never a second copy."""
    package = sys.modules[__name__]
    for info in pkgutil.walk_packages(engine.__path__, f"{engine.__name__}."):
        module = importlib.import_module(info.name)
        flat = info.name.removeprefix(f"{engine.__name__}.")
        sys.modules[f"{__name__}.{flat}"] = module
        if "." not in flat:
            setattr(package, flat, module)


_keep_flat_module_paths()


def __dir__() -> list[str]:
    """The public API only (`__all__`, and the lazily loaded `widgets`), not the names this
    module uses to build itself."""
    return sorted([*__all__, "widgets"])


def __getattr__(name: str) -> ModuleType:
    """`tw.widgets` on first use: importing ipywidgets costs more than the whole engine, so
    `import twodwalk` does not (PEP 562 module __getattr__)."""
    if name == "widgets":
        return importlib.import_module("twodwalk.widgets")
    raise AttributeError(f"module 'twodwalk' has no attribute {name!r}")
