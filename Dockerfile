# fusecache in front of a model server: the image of a Function Compute custom-container
# GPU function, or of any container platform. The platform mounts the OSS bucket at
# /mnt/oss; fusecache mounts its cache over it at /models, then starts the model server.
# The container needs /dev/fuse and the right to mount (CAP_SYS_ADMIN as root, or
# fusermount3 as a user): see the README's "Deployment".

# --- build: wheels of fusecache (with its C extension) and of what it needs ---------
FROM python:3.11-slim-bookworm AS build
# What pyfuse3 and the C extension compile against. Versions come from the base
# image's Debian release, whose updates are security fixes: pinning them would
# break the build at each one.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libfuse3-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# --- the image --------------------------------------------------------------------
FROM python:3.11-slim-bookworm
# fuse3: libfuse and fusermount3; attr: getfattr, which reads the user.fusecache.* xattrs.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends fuse3 attr \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /models
COPY --from=build /wheels /wheels
# Without the C block copy fusecache would run its slower pure-Python twin: the
# daemon refuses to (FUSECACHE_REQUIRE_NATIVE), and the build fails here first.
ENV FUSECACHE_REQUIRE_NATIVE=1
RUN pip install --no-cache-dir --no-index --find-links /wheels /wheels/fusecache-*.whl \
    && rm -rf /wheels \
    && python -c "import fusecache._native" \
    && fusecache --version

# Settings come from the environment (FUSECACHE_MEM_CACHE=4G, FUSECACHE_WARM=...),
# so the platform's console can change them without a rebuild.
ENTRYPOINT ["fusecache", "run", "/mnt/oss", "/models", "--"]
# A stand-in for the model server, which replaces it: it serves /models over HTTP
# on Function Compute's default port.
EXPOSE 9000
CMD ["python", "-m", "http.server", "--directory", "/models", "9000"]
