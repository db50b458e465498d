"""The benchmark: an OSS stand-in and the model-switching workload (as fusecache.bench)."""
