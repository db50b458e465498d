"""fusecache: a read-only caching FUSE layer over slow object-store mounts."""

__version__ = "0.1.0"
