"""The real system, one module per actor, in the order of the diagram: physical memory and
units, entry formats and the tables they live in, the one generic walker and the x86 paging
rules it follows, EPT around the walk, the translation caches, the processor core a vCPU and a
bare-metal CPU share, the guest OS, the host kernel, KVM, and the machine that wires them.

Nothing here imports matplotlib, networkx or ipywidgets: views and widgets read the trace the
engine records (trace.py) and never reach back in."""
