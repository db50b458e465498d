"""The filesystem the kernel talks to: `FilesystemCore` (core.py) is what fuse_ops.py calls."""
