# A Function Compute style image: fusecache mounts over the platform's OSS mount
# before the model server starts. Filled in by the Function Compute container issue.
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends fuse3 libfuse3-dev pkg-config gcc \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/fusecache
COPY . .
# The C block copy must be built and used: without it the image would run the
# slower pure-Python twin without anyone noticing.
ENV FUSECACHE_REQUIRE_NATIVE=1
RUN pip install --no-cache-dir . && fusecache --version | grep -q "native C"
ENTRYPOINT ["fusecache"]
