"""Hooks the tests and benchmarks/faults.py use to inject faults; inert unless their variables are set."""
