# tessera: the two entry points are `make demo` and `make test`; both install what is missing.
BUILD ?= build
ASAN_BUILD ?= build-asan
JOBS ?= $(shell nproc)
CTEST_JOBS ?= 2

.PHONY: all deps build test test-release test-asan test-simd demo bench clean

all: build

deps:
	@bash scripts/install_deps.sh

build: deps
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release
	cmake --build $(BUILD) -j$(JOBS)

# Every test in release mode, then the unit tests once more under ASan + UBSan on small shapes.
test: test-release test-asan

test-release: build
	cd $(BUILD) && ctest --output-on-failure -j$(CTEST_JOBS) --timeout 900

# Only the kernel suites on the SIMD targets below the CPU's best (also part of test-release;
# TESSERA_TEST_TARGET=<name> picks one for a manual run of build/tests/tessera_tests).
test-simd: build
	cd $(BUILD) && ctest --output-on-failure -j$(CTEST_JOBS) -L simd_target

test-asan: deps
	cmake -S . -B $(ASAN_BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DTESSERA_SANITIZE=ON \
	  -DTESSERA_BUILD_TOOLS=OFF
	cmake --build $(ASAN_BUILD) -j$(JOBS)
	cd $(ASAN_BUILD) && TESSERA_SMALL_TESTS=1 ctest --output-on-failure -j$(CTEST_JOBS) --timeout 1800

# The main job: tessera against naive BLAS attention from 1K to 16K tokens (table + plot).
demo: build
	bash scripts/demo.sh $(BUILD)/tools/tessera

clean:
	rm -rf $(BUILD) $(ASAN_BUILD)
