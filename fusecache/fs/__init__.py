"""The filesystem the kernel talks to: `FilesystemCore` (core.py) is what fuse_ops.py calls.

Its rooms: answers.py (the lower mount's known answers), lowerfile.py (one version of a lower
file and its pins), versions.py (which version of each file is current), opening.py (opening
that version), pagecache.py (calls into the kernel's page cache), readonce.py (whole-file
fetches and the sha256 xattr), stats.py (the daemon's counters).
"""
