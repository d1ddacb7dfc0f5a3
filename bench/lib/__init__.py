"""Helpers shared by the benchmark scripts (not scripts themselves: bench/*.py are)."""
