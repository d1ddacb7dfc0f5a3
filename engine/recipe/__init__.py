"""The typed recipe: one config per stage (`configs`) and its YAML files with line-precise errors (`files`).

The vocabulary every other part speaks.

May import: nothing from the rest of the engine, so the UI, the CLI and every job can load it without torch.
"""
