"""Not code: marks this folder as the package data `cmft._bundled.export` (setup.py maps it into the wheel)."""
