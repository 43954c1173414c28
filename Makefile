# mtlrun: `make run` sets everything up and trains on the built-in benchmark; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# On x86_64 the pinned torch/torchvision wheels lie on the development machines' disk: pin them so
# installing never downloads several GB. Elsewhere pip resolves the package's own ranges.
CONSTRAINTS := $(if $(filter x86_64,$(shell uname -m)),-c constraints.txt,)
ARGS ?=

.PHONY: install run test test-fast bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(CONSTRAINTS) -e '.[test,cluster,search,trackers]'
	touch $@

run: install
	$(BIN)/mtlrun $(ARGS)

# The tests run in one process per core (pytest-xdist), each test file in one process, each with one torch thread
# unless OMP_NUM_THREADS says otherwise (more threads per process only oversubscribe the cores: 12 min instead of
# 9 on 2 cores; the suite passes with either).
test: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q -n auto --dist loadfile

test-fast: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q -n auto --dist loadfile -m "not slow"

bench: install
	$(BIN)/python -m mtlrun.bench $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun *.egg-info

# Convert a real dataset you have: make data-nyuv2 SRC=/path/to/nyuv2 (or cityscapes, celeba).
data-%: install
	@test -n "$(SRC)" || { echo "make data-$*: give the source, e.g. make data-$* SRC=/path/to/$*"; exit 2; }
	$(BIN)/python data_scripts/$*.py --src $(SRC) --out data/$*.h5 $(ARGS)
