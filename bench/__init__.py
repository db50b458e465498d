"""The benchmark: an OSS stand-in and the model-switching workload (installed as fusecache.bench)."""
