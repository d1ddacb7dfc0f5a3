"""Evaluation: the pass rule (`scoring`), eval loss + generation + weight error of one model (`evaluator`) and the
results table across stages (`results`).

May import: `engine.recipe`, `engine.data`, `engine.fp4`, `storage`.
"""
