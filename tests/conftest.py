import sys
from pathlib import Path

# The spawned ranks import the worker modules by name: make tests/ importable in them too.
sys.path.insert(0, str(Path(__file__).parent))
