# The README's two quick-start commands.
.PHONY: demo test lint setup

setup:
	bash scripts/setup.sh

# The main job: an OSS stand-in, then the model-switching bench with and without fusecache.
demo:
	EXTRAS=test,bench bash scripts/setup.sh
	.venv/bin/fusecache bench

# The test suite, including real FUSE mounts (needs root or /dev/fuse access).
# FUSECACHE_REQUIRE_NATIVE: a C module that failed to build fails the run
# instead of hiding behind the pure-Python twin.
test: setup
	.venv/bin/ruff check .
	FUSECACHE_REQUIRE_NATIVE=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests

lint: setup
	.venv/bin/ruff check .
	.venv/bin/mypy fusecache
