"""`python -m agentbus.schema [DIR]`: write every JSON Schema file (default: ./schemas)."""

from __future__ import annotations

import sys
from pathlib import Path

from agentbus.schema import write

if __name__ == "__main__":
    for path in write(Path(sys.argv[1] if len(sys.argv) > 1 else "schemas")):
        print(path)
