"""The headless face of the product, beside `launch.py`: `commands` (run, resume, cancel, status) and `flags`
(one CLI flag per recipe field, generated from `engine.recipe.configs`).

May import anything in `engine` and `storage`; nothing imports it but `launch.py`.
"""
