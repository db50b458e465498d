"""The benchmark: an OSS stand-in, the model-switching workload and the tools that time it."""
