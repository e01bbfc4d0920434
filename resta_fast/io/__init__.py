"""Checkpoint input/output: validated mmap reading, preallocated atomic writing."""
