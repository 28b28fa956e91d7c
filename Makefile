# Two commands on a fresh machine:  `make demo` (set up + run the demo)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
DEMO_OUT ?= demo_out
# Nextflow's runtime from Maven Central (scripts/install-nextflow), put first on PATH for the tests
NXF_RUNTIME ?= .nextflow-runtime
NEXTFLOW     = $(NXF_RUNTIME)/bin/nextflow
TEST_PATH    = $(CURDIR)/$(BIN):$(CURDIR)/bin:$(CURDIR)/$(NXF_RUNTIME)/bin:$$PATH

.PHONY: demo test test-fast lint-nf nextflow image base-image bench lock clean go
.DEFAULT_GOAL := demo

$(BIN)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# the lock pins every dependency; torch==2.13.0 resolves to the CPU wheel on machines that have it
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/pip install --quiet "pytest>=8" "pytest-timeout>=2.3"
	touch $@

demo: $(BIN)/.installed  ## set up, then run QC -> align -> pretrain -> fine-tune -> embed -> annotate -> report
	$(BIN)/scfm demo -o $(DEMO_OUT)

nextflow: $(NEXTFLOW)  ## Nextflow from Maven Central, checked against scripts/nextflow/SHA256SUMS

$(NEXTFLOW): scripts/install-nextflow scripts/nextflow/pom.xml scripts/nextflow/SHA256SUMS scripts/nextflow/nextflow
	scripts/install-nextflow $(NXF_RUNTIME)

# scfm's image (containers/Dockerfile) with podman, or docker where a daemon answers. BASE_IMAGE: any
# base with apt and python3.11 (default: the Dockerfile's CUDA runtime image); base-image makes a
# Debian one without a registry (debootstrap, root): make base-image && make image BASE_IMAGE=scfm-base:bookworm
BASE_IMAGE ?=
IMAGE_TAG  ?=
image:  ## the container image, tagged scfm:<version> (what --container names by default)
	containers/build-image $(if $(BASE_IMAGE),--base $(BASE_IMAGE)) $(if $(IMAGE_TAG),--tag $(IMAGE_TAG))

base-image:  ## a minimal Debian base image made with debootstrap, for machines without a registry
	containers/build-base-image

test: $(BIN)/.installed $(NEXTFLOW)  ## the whole test suite (what CI runs), real Nextflow runs included
	PATH="$(TEST_PATH)" $(BIN)/pytest

test-fast: $(BIN)/.installed $(NEXTFLOW)
	PATH="$(TEST_PATH)" $(BIN)/pytest -m "not slow"

lint-nf: $(BIN)/.installed  ## the Nextflow language-server lint alone (needs Java 17)
	$(BIN)/pytest tests/pipeline/test_nf_lint.py

bench: $(BIN)/.installed
	$(BIN)/python bench/qc_align.py
	$(BIN)/python bench/embed.py
	$(BIN)/python bench/train.py

go:  ## GO BP databases for `scfm genes` enrichment (Debian packages, pinned + SHA-256) -> $$SCFM_GO_DIR or ~/.cache/scfm/go
	scripts/install_go.sh

lock: $(BIN)/.installed  ## rewrite requirements.lock from the current environment
	{ head -2 requirements.lock; $(BIN)/pip freeze --exclude-editable | sed 's/+cpu$$//' | grep -v '^pytest'; } > requirements.lock.tmp
	mv requirements.lock.tmp requirements.lock

clean:
	rm -rf $(VENV) $(DEMO_OUT) $(NXF_RUNTIME) .pytest_cache
