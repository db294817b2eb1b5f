"""Notebook helpers (ipywidgets), each a thin layer over a plain model that reads the engine's
trace: nothing here translates an address itself.

- `AddressExplorer(machine_or_scenario)`: type or slide a GVA; see its walk and where it lands.
- `WalkStepper(result_or_machine, gva)`: a 2D walk reference by reference.
- `WhatIfLab(machine_or_scenario, gva)`: swap, migrate, KSM, THP, memslots, dirty logging,
  EPT/shadow, a guest PTE edit with and without INVLPG; what changed, before and after.
- `MemoryInspector(machine, address, space)`: a page of memory, entry by entry, decoded.
- `Exercise(question_or_seed, topic)`: a seeded question with Check, Hint and Reveal.

The models (`ExplorerModel`, `StepperModel`, `WhatIfModel`, `InspectorModel`,
`ExerciseModel`) live in the modules of the same names and import no ipywidgets.
"""

from twodwalk.widgets.ui import AddressExplorer, Exercise, MemoryInspector, WalkStepper, WhatIfLab

__all__ = ["AddressExplorer", "Exercise", "MemoryInspector", "WalkStepper", "WhatIfLab"]
