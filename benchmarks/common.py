"""What every benchmark shares: JSON-lines output."""

import json


def emit(row: dict) -> dict:
    """Prints one measurement as a JSON line (flushed, so a long run shows progress)."""
    print(json.dumps(row), flush=True)
    return row
