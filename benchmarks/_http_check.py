"""The response check ``HttpEventTrigger`` runs on every poll in bench_triggerer.py: is the execution done?

A module of its own because the trigger imports (and re-imports) its check by dotted path.
"""

from __future__ import annotations

from typing import Any

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "EXPIRED"}


async def execution_finished(response: Any) -> bool:
    """True once the polled execution document has a terminal status (what our trigger checks)."""
    return response.json().get("status") in TERMINAL
