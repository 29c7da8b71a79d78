# yoloprune: the two commands a new user runs are `make compile` and `make test`.
PYTHON_SYS ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

MODEL ?= yolov5s.yaml
IMGSZ ?=
RATIO ?=
MACS ?= 0.5
OUT ?= runs/compile
IMPORTANCE ?=
ROUND_TO ?=
ARGS ?=

# "None means default": only pass flags the user set.
COMPILE_FLAGS := $(if $(IMGSZ),--imgsz $(IMGSZ)) $(if $(RATIO),--ratio $(RATIO),$(if $(MACS),--macs $(MACS))) \
	$(if $(IMPORTANCE),--importance $(IMPORTANCE)) $(if $(ROUND_TO),--round-to $(ROUND_TO)) --out $(OUT) $(ARGS)

.PHONY: install compile graph test lint format bench data eval clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and explicitly: the CPU wheel; letting pip resolve it pulls CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

compile: install
	$(PY) -m compiler compile $(MODEL) $(COMPILE_FLAGS)

graph: install
	$(PY) -m compiler graph $(MODEL) $(if $(IMGSZ),--imgsz $(IMGSZ))

DATA ?= runs/data/shapes/data.yaml

data: install
	$(PY) -m compiler data

eval: install
	$(PY) -m compiler eval $(MODEL) --data $(DATA) $(if $(IMGSZ),--imgsz $(IMGSZ)) $(ARGS)

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install
	$(PY) benchmarks/compile_yolov5.py

clean:
	rm -rf runs .pytest_cache
