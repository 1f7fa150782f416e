# `make demo` and `make test` each create .venv on a fresh machine (Python >= 3.10) and then run.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test recipes install clean chromium sandbox

install: $(STAMP)

# llama-cpp-python (in the test extra: the GGUF tests run every export in llama.cpp) is built from source; these
# flags build only the library it loads, for this CPU (no multimodal lib, tools, server, examples or tests).
# pip keeps the built wheel in its cache (a wheel for this machine's CPU), so recreating .venv does not compile
# it again.
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
	-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF

# constraints.txt pins torch 2.13.0, whose CPU build is what these machines install; a looser pin pulls CUDA.
# The demo needs the package and the embedded model only; the tests add their tools (and the llama.cpp build).
# Not --quiet: pip says what it collects and installs, so a slow download is never a silent minute.
# --no-compile: pip byte-compiles every file it installs (torch, transformers: 54 s with it, 19 s without, 2 cores);
# the demo imports a fraction of them, compiled when first imported. The test set-up compiles everything once,
# since its many subprocesses would each compile what they import where the environment forbids writing .pyc.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --no-compile -c constraints.txt -e '.[embedded,serve]'
	touch $(STAMP)

# xgrammar (constrained decoding) is installed without its dependencies: on Linux x86_64 it asks for triton,
# about 1 GB that CPU decoding never imports; its one other need, apache-tvm-ffi, is named here.
CONSTRAIN_STAMP := $(VENV)/.installed-constrain
$(CONSTRAIN_STAMP): $(STAMP)
	$(VENV)/bin/pip install --quiet --no-deps -c constraints.txt xgrammar apache-tvm-ffi
	touch $(CONSTRAIN_STAMP)

# test-tools is the test extra less xgrammar (installed above without triton); `pip install -e '.[test]'` alone
# gets the same set with triton.
$(TEST_STAMP): $(CONSTRAIN_STAMP)
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(VENV)/bin/pip install --quiet -c constraints.txt -e '.[embedded,serve,test-tools]'
	@# a file this Python cannot compile (torch ships Python 3.12-only test helpers) is skipped, as pip skips it
	$(VENV)/bin/python -m compileall -q -j 0 $(VENV)/lib >/dev/null || true
	touch $(TEST_STAMP)

demo: $(STAMP) sandbox
	$(VENV)/bin/specialist run examples/log-to-json/config.yaml

# Every recipe under examples/, one after another (each at most 20 minutes on 2 CPU cores); all run even
# when one fails a gate, and the exit status says whether any did.
RECIPES ?= log-to-json bug-triage support-routing test-generation log-root-cause safety-refusals domain-adaptation
recipes: $(CONSTRAIN_STAMP) sandbox
	@status=0; for recipe in $(RECIPES); do \
	  echo "== $$recipe"; $(VENV)/bin/specialist run examples/$$recipe/config.yaml || status=1; \
	done; exit $$status

test: $(TEST_STAMP) chromium sandbox
	$(VENV)/bin/python -m pytest

# The report test renders report.html in Debian's headless Chromium; it is skipped where that cannot be installed.
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium not installed: the report rendering test will be skipped"; }

# Generated test code (the tests_pass and mutation_kill scorers) runs inside bubblewrap where it can; elsewhere a
# weaker fallback that does not guard files is used (src/specialist/core/code_tests.py says what it guards).
sandbox:
	@command -v bwrap >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null) || \
	  echo "bubblewrap not installed: generated tests will run in the weaker fallback sandbox"; }

clean:
	rm -rf $(VENV) runs
