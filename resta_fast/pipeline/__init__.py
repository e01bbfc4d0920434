"""Streaming execution: one engine for every path (a patch is a fused group of one).

Data flows one way, one concept per module:

    job.py       what a pass is given (plan, inputs, output dir) and fills in (stats, error)
    engine.py    the scheduler: tensors in order, chunks staged one ahead, every job per chunk
    staging.py   how input chunks reach memory: mmap views, or reader threads preading into buffers
    compute.py   where the kernel runs: host memory, or a device with copy streams (every wait is here)
    device.py    what the engine asks of a device (copies, kernel, events, streams); CUDA implements it
    buffers.py   the bounded pools of reusable (pinned on a GPU) buffers
    writer.py    the writer threads: pwrite at precomputed offsets, in order
    hashing.py   sha256 of each output file, following its writes
    interrupt.py Ctrl-C / SIGTERM stop at tensor boundaries
"""
