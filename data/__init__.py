"""Not code: marks this folder as the package data `cmft._bundled.data` (setup.py maps it into the wheel)."""
