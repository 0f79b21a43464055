import os
import sys

# This folder is named like the `checkpoints` package; with the repository root first on sys.path,
# `import checkpoints` finds the package (not this folder as a namespace) however pytest is started.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
