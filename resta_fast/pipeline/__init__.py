"""Streaming execution of a plan: read (mmap) -> kernel -> write, chunk by chunk."""
