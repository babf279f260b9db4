"""ch05_finetuning: see the chapter notebook.

Importing the package imports its task modules, whose config classes register the tasks in
`FinetuneConfig.TASKS` (the command line and saved runs look tasks up there).
"""
from ch05_finetuning import classification, instructions, lora, preferences, rl  # noqa: F401  (registers tasks)
