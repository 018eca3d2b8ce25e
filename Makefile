# Everything runs from a local virtualenv that `setup` creates; no manual steps.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup data campaign sweep test lint bench train clean board-check

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[host,dev,cluster]'
	touch $(STAMP)

# Fashion-MNIST, the dataset method comparisons use (Debian's package puts it where the reader
# looks by default). Installs it as root; otherwise says what to run.
FASHION_MNIST := /usr/share/datasets/fashion-mnist
data:
	@if [ -f $(FASHION_MNIST)/t10k-labels-idx1-ubyte.gz ]; then echo "Fashion-MNIST: $(FASHION_MNIST)"; \
	elif [ "$$(id -u)" = "0" ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else echo "Fashion-MNIST is not installed; run: sudo apt-get install dataset-fashion-mnist"; exit 1; fi

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy runtime server
	$(BIN)/mypy models testbed

bench: setup
	$(BIN)/python bench/run.py --out bench.json

# The main job: eight emulated boards, embedded broker, bundled dataset; leaves runs/default/.
campaign: setup
	$(BIN)/orchard campaign run campaigns/default.toml --out runs/default --force --quiet

# Width methods on one 3-tier fleet, 3 seeds, Fashion-MNIST: the README's comparison table.
sweep: setup data
	$(BIN)/orchard campaign sweep campaigns/compare-width.toml --out runs/compare-width --force --quiet

# The bundle's install.sh and the runtime in an arm64 Debian bookworm root under qemu-user (root;
# installs qemu-user-static and debootstrap if missing). Not part of `make test`.
board-check: setup
	bash testbed/board_check.sh
# DISTREAL against its baselines under time-varying CPU, 3 seeds: the README's DISTREAL table.
sweep-distreal: setup data
	$(BIN)/orchard campaign sweep campaigns/compare-distreal.toml --out runs/compare-distreal --force --quiet

# Central training through the device trainer (one profile).
train: setup
	$(BIN)/orchard train --model cnn --dataset digits --profile width=0.5 --steps 300 --json out.json

clean:
	rm -rf $(VENV) .cache runs bench.json out.json
