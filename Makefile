# One-command setup: every target creates .venv and installs the project into it first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BUILD := build
CORPUS_DIR ?= .cache/corpus

.PHONY: demo test test-corpus fuzz bench-tool venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## make demo: build the sample model and optimize it under validation, printing the report.
demo: $(STAMP)
	mkdir -p $(BUILD)
	$(PY) -m models.sample $(BUILD)/sample.onnx
	$(VENV)/bin/onnx-rewriter analyze $(BUILD)/sample.onnx --top 8
	$(VENV)/bin/onnx-rewriter optimize $(BUILD)/sample.onnx -o $(BUILD)/sample.opt.onnx --report $(BUILD)/sample.report.json
	@echo "report: $(BUILD)/sample.report.json"

## make test: the default test suite (no network, no corpus models).
test: $(STAMP)
	$(PY) -m pytest -q

## make fuzz: the exact-pass property test with >= 10,000 generated graphs (hypothesis "fuzz" profile).
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q tests/test_property_exact.py --hypothesis-show-statistics

## make test-corpus: fetch the real models of the corpus and run the tests that need them.
test-corpus: $(STAMP)
	$(PY) scripts/fetch_corpus.py --dest $(CORPUS_DIR)
	ONNX_REWRITER_CORPUS=$(CORPUS_DIR) $(PY) -m pytest -m corpus -q

## make bench-tool: tool wall time on open-nsfw against onnxslim (installs onnxslim into the venv).
bench-tool: $(STAMP)
	$(PY) -m pip install --quiet onnxslim
	$(PY) scripts/fetch_corpus.py --dest $(CORPUS_DIR)
	$(PY) benchmarks/tool_time.py --corpus $(CORPUS_DIR)

clean:
	rm -rf $(VENV) $(BUILD) .pytest_cache
