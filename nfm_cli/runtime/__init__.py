"""Runtime: what every step needs from the process it runs in, with no knowledge of the math.

``progress`` (the callback the core reports through), ``interrupt`` (SIGINT/SIGTERM as a pending
request the steps honour between units), ``distributed`` (torchrun ranks), ``devices``, ``memory``
(what is still available: cgroups, MemAvailable, the GPU), ``rng`` (randomness keyed by seed and
purpose), ``files`` (file hashes and the careful safetensors reader).

Imports only ``errors`` and the standard library / torch: the bottom of the core.
"""
