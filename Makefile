# One-command setup: every target creates .venv and installs the project into it first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BUILD := build
CORPUS_DIR ?= .cache/corpus

.PHONY: demo test docs test-corpus fuzz fuzz-io audit bench-tool bench bench-zoo bench-profiles bench-precision html-check venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# make demo needs less than the dev extras: the package and the digits data (scikit-learn's bundled copy).
DEMO_STAMP := $(VENV)/.installed-demo
$(DEMO_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[digits]'
	touch $(DEMO_STAMP)

ONNX_BOTTLENECK := $(VENV)/bin/onnx-bottleneck
DIGITS := models/digits/digits_cnn.onnx
DIGITS_TASK := examples/digits_task.py

## make demo: the whole job on embedded data, in about a minute once the venv is made. Latency is timed on ONE
## onnxruntime thread (--threads 1), interleaved A/B pairs, with a 95% bootstrap CI.
##   1. analyze the trained digits CNN: its expensive 3x3 convs, ranked;
##   2. the exact passes (fusions: no accuracy change) on the sample model;
##   3. the lossy bottleneck pass on the digits CNN, calibrated on its real training digits and gated on top-1
##      (examples/digits_task.py: held-out digits, half for the search, half for the confirmation after it).
## Reports (JSON and HTML) in build/.
demo: $(DEMO_STAMP)
	mkdir -p $(BUILD)
	@echo "== 1/3  Where the MACs are: the trained digits CNN (models/digits/), batch 8"
	$(ONNX_BOTTLENECK) analyze $(DIGITS) --input-shape input:8x1x32x32 --top 5
	@echo "== 2/3  Exact passes on the sample model (latency timed on 1 onnxruntime thread)"
	$(PY) -m models.sample $(BUILD)/sample.onnx
	$(ONNX_BOTTLENECK) optimize $(BUILD)/sample.onnx -o $(BUILD)/sample.opt.onnx --threads 1 \
		--report $(BUILD)/sample.report.json --html $(BUILD)/sample.report.html
	@echo "== 3/3  1x1 bottlenecks on the digits CNN: real digits as data, top-1 as the metric (1 onnxruntime thread)"
	$(ONNX_BOTTLENECK) optimize $(DIGITS) -o $(BUILD)/digits.opt.onnx --passes bottleneck --max-error 'cosine>=0.999' \
		--input-shape input:8x1x32x32 --data-loader-script $(DIGITS_TASK):load_data \
		--metric $(DIGITS_TASK):top1 --max-metric-drop 0.01 --threads 1 --time-budget 90 \
		--report $(BUILD)/digits.report.json --html $(BUILD)/digits.report.html
	@echo "reports: $(BUILD)/sample.report.{json,html}, $(BUILD)/digits.report.{json,html}"

## make test: the layers contract (import-linter, pyproject.toml), then the default test suite (no network,
## no corpus models).
test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

## make docs: build the documentation site (mkdocs.yml, pages in docs/) into build/site with `mkdocs build
## --strict`: a broken internal link or anchor fails it (tests/test_docs.py runs the same check in make test).
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir $(BUILD)/site
	@echo "site: $(BUILD)/site/index.html"

## make html-check: the optimize report of the sample, the sweep page of a small sweep of it and the recorded NudeNet
## sweep page, laid out in headless chromium (no overlapping labels, no placeholder text, no empty section) and
## screenshotted (not blank): pages and screenshots in build/. Installs chromium with apt-get when missing and run as
## root; else fails with the command to run (CHROMIUM=/path/to/chrome picks another browser).
html-check: $(STAMP)
	@if [ -z "$$CHROMIUM" ] && ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get install -y chromium || { apt-get update && apt-get install -y chromium; }; \
		else echo "make html-check needs chromium: sudo apt-get install chromium (or set CHROMIUM=/path/to/chrome)" >&2; exit 1; fi; \
	fi
	mkdir -p $(BUILD)
	ONNX_BOTTLENECK_REQUIRE_CHROMIUM=1 ONNX_BOTTLENECK_HTML_OUT=$(BUILD) \
		$(PY) -m pytest -q tests/test_html_browser.py -p no:cacheprovider
	@echo "pages: $(BUILD)/report.html $(BUILD)/sweep.html $(BUILD)/sweep_nudenet.html; screenshots: the same names, .png"

## make fuzz: the exact-pass property test with >= 10,000 generated graphs (hypothesis "fuzz" profile).
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q tests/test_property_exact.py --hypothesis-show-statistics

## make fuzz-io: the loader fuzz targets (raw bytes; mutated valid models through load, analyze and a
## pass), 10,000 inputs each (hypothesis "fuzz" profile); anything but InputError is a failure.
fuzz-io: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q tests/test_fuzz_io.py -p no:cacheprovider --hypothesis-show-statistics

## make audit: known vulnerabilities of the installed environment (installs pip-audit into the venv); fails,
## rather than passing unseen, when no vulnerability service (PyPI JSON API, OSV) can be reached.
audit: $(STAMP)
	$(PY) -m pip install --quiet pip-audit
	$(PY) scripts/audit.py

## make test-corpus: fetch the real models of the corpus and run the tests that need them.
test-corpus: $(STAMP)
	$(PY) scripts/fetch_corpus.py --dest $(CORPUS_DIR)
	ONNX_BOTTLENECK_CORPUS=$(CORPUS_DIR) $(PY) -m pytest -m corpus -q

## make bench-tool: the cost of proof -- wall time and peak memory of the default optimize against onnxslim on every
## corpus model and the zoo's ResNet-50 and U-Net (installs onnxslim); writes docs/tool_time.json.
bench-tool: $(STAMP)
	$(PY) -m pip install --quiet onnxslim
	$(PY) scripts/fetch_corpus.py --dest $(CORPUS_DIR)
	$(PY) -m benchmarks.tool_time --corpus $(CORPUS_DIR) --json docs/tool_time.json

## make bench: corpus, sample and zoo models through our optimize (exact; then bottleneck at a budget),
## onnxslim, onnx-simplifier and onnxruntime's offline optimizer; writes docs/bench.md and docs/bench.json.
## BENCH_ARGS passes options, e.g. BENCH_ARGS='--quick' or BENCH_ARGS='--models open-nsfw,resnet50'.
bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) scripts/fetch_corpus.py --dest $(CORPUS_DIR)
	$(PY) -m benchmarks.bench --corpus $(CORPUS_DIR) $(BENCH_ARGS)

## make bench-zoo: every corpus model and every builder model (models/zoo.py, sample, repvgg), with their dynamic
## dims, through ONE optimize-many job (settings: benchmarks/zoo.toml); writes the "Zoo job" section of docs/bench.md
## and docs/bench_zoo.json. BENCH_ZOO_ARGS passes options, e.g. BENCH_ZOO_ARGS='--ray-address local' (needs the
## 'ray' extra) or BENCH_ZOO_ARGS='--jobs 1'.
bench-zoo: $(STAMP)
	$(PY) scripts/fetch_corpus.py --dest $(CORPUS_DIR)
	$(PY) -m benchmarks.zoo --corpus $(CORPUS_DIR) $(BENCH_ZOO_ARGS)

## make bench-precision: structure x precision against onnxruntime's int8 PTQ alone -- the digits CNN (top-1 on
## held-out digits for int8 alone, ours in float, ours with int8), NudeNet 320n (cosine on unseen crops) and open-nsfw (plain against guarded int8 under its
## score budget, judged on unseen crops), with latency at 1 thread; writes docs/precision_digits.json, docs/int8_nsfw.json.
bench-precision: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) scripts/fetch_corpus.py --dest $(CORPUS_DIR)
	$(PY) -m benchmarks.precision_digits --nudenet $(CORPUS_DIR) --json docs/precision_digits.json
	$(PY) -m benchmarks.int8_nsfw --corpus $(CORPUS_DIR) --latency --json docs/int8_nsfw.json

## make bench-profiles: a lossy search on a trained detector of the corpus judged at two deployment profiles
## (--profile threads=1,batch=1 --profile threads=2,batch=8) through the CLI; writes docs/profiles_nudenet.json.
bench-profiles: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) scripts/fetch_corpus.py --dest $(CORPUS_DIR)
	$(PY) -m benchmarks.profiles --corpus $(CORPUS_DIR) --json docs/profiles_nudenet.json $(BENCH_PROFILES_ARGS)

clean:
	rm -rf $(VENV) $(BUILD) .pytest_cache
