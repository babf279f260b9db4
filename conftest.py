"""Test-suite set-up shared by the unit tests and the notebooks nbval runs.

The suite always runs at smoke scale: every notebook cell runs in seconds and its asserts still hold.
Notebook kernels are started by nbval after this file is imported, so they inherit the variable.
"""

import os

os.environ["LLM_SCALE"] = "smoke"
