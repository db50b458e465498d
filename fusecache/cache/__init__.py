"""The daemon's block cache: `BlockCache` (blocks.py) is what the filesystem uses.

Its rooms: flights.py (single-flight fetches from below or from disk), memory.py (the memory
tier and which pages the kernel holds), spill.py (blocks on their way to the disk tier),
disk.py (the disk tier itself).
"""
