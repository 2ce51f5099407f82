"""Not code: marks this folder as the package data `cmft._bundled.recipes` (setup.py maps it into the wheel)."""
