# yoloprune: the two commands a new user runs are `make compile` and `make test`.
PYTHON_SYS ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DEFAULT_MODEL := graphs/weights/yolov5n-shapes.pt
SHAPES := runs/data/shapes/data.yaml
MODEL ?= $(DEFAULT_MODEL)
# The default model comes with its data (synthetic shapes, generated on first use), so the first
# compile reports mAP as well as latency; other models get --data only if DATA is given.
DATA ?= $(if $(filter $(DEFAULT_MODEL),$(MODEL)),$(SHAPES))
EPOCHS ?=
IMGSZ ?=
RATIO ?=
MACS ?=
SPEEDUP ?=
OUT ?= runs/compile
IMPORTANCE ?=
ROUND_TO ?=
ARGS ?=
RUNTIME ?= ort
BATCH ?=
PRUNED ?= $(OUT)/$(basename $(notdir $(MODEL)))-pruned.pt

# The embedded model's demo: MACs 0.35 unless a target is given, then seven epochs of distilled
# fine-tuning on its data at batch 16 and lr0 0.005, measuring mAP after the last only (2-3
# minutes on 2 cores with the data's generation; README, benchmarks/demo_budget.py,
# benchmarks/demo_batch.py: batch 16 the same mAP as the CLI's batch 8 in 0.76 of the time);
# EPOCHS=0 skips the fine-tune, and EPOCHS=N fine-tunes N with the CLI's defaults and mAP after
# every epoch. Any other model: the CLI's defaults (--macs 0.5, one-shot).
EMBEDDED := $(filter $(DEFAULT_MODEL),$(MODEL))
DEMO_MACS := 0.35
DEMO_EPOCHS := 7
DEMO_BATCH := 16
DEMO_LR0 := 0.005
TARGET_FLAG := $(if $(RATIO),--ratio $(RATIO),$(if $(MACS),--macs $(MACS),\
	$(if $(SPEEDUP),--speedup $(SPEEDUP),$(if $(EMBEDDED),--macs $(DEMO_MACS)))))
EPOCHS_FLAG := $(if $(EPOCHS),$(if $(filter-out 0,$(EPOCHS)),--epochs $(EPOCHS)),\
	$(if $(EMBEDDED),--epochs $(DEMO_EPOCHS) --batch $(DEMO_BATCH) --lr0 $(DEMO_LR0) --eval-every 0))

# "None means default": only pass flags the user set.
COMPILE_FLAGS := $(if $(IMGSZ),--imgsz $(IMGSZ)) $(TARGET_FLAG) \
	$(if $(IMPORTANCE),--importance $(IMPORTANCE)) $(if $(ROUND_TO),--round-to $(ROUND_TO)) \
	$(if $(DATA),--data $(DATA)) $(EPOCHS_FLAG) --out $(OUT) $(ARGS)

.PHONY: install install-ultralytics compile graph test lint format bench benchmarks \
	benchmarks-accuracy data eval clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and explicitly: the CPU wheel; letting pip resolve it pulls CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

compile: install $(if $(filter $(SHAPES),$(DATA)),$(SHAPES))
	$(PY) -m yoloprune compile $(MODEL) $(COMPILE_FLAGS)

$(SHAPES): | install
	$(PY) -m yoloprune data --out $(dir $(SHAPES))

graph: install
	$(PY) -m yoloprune graph $(MODEL) $(if $(IMGSZ),--imgsz $(IMGSZ))

data: install
	$(PY) -m yoloprune data --out $(dir $(SHAPES))

eval: install $(if $(filter $(SHAPES),$(DATA)),$(SHAPES))
	$(PY) -m yoloprune eval $(MODEL) --data $(or $(DATA),$(SHAPES)) $(if $(IMGSZ),--imgsz $(IMGSZ)) $(ARGS)

# The optional ultralytics extra (AGPL-3.0) for YOLOv8 models: not part of `make install`.
# ultralytics and torchvision go in with --no-deps: torchvision's only wheel here is a CUDA build
# (never imported; ultralytics reads its version at import), and its deps would pull CUDA.
UL_STAMP := $(VENV)/.ultralytics
install-ultralytics: $(UL_STAMP)

$(UL_STAMP): $(STAMP)
	$(PY) -m pip install -q opencv-python-headless
	$(PY) -m pip install -q --no-deps ultralytics==8.4.190 torchvision==0.28.0
	touch $(UL_STAMP)

# Tests run with the extra so the ultralytics tests run (they skip, with the reason, without it).
# One pytest worker per core (pytest-xdist; whole files to a worker, so module fixtures are
# built once), then the tests that assert on wall-clock measurements alone (marker `timing`).
test: install install-ultralytics
	$(PY) -m pytest -q -n auto --dist loadfile -m "not timing"
	$(PY) -m pytest -q -m timing

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Baseline vs the compiled model, interleaved: make bench [MODEL=..] [PRUNED=..] [RUNTIME=ort|torch|tensorrt]
bench: install
	$(PY) -m yoloprune bench $(MODEL) $(wildcard $(PRUNED)) --runtime $(RUNTIME) $(if $(BATCH),--batch $(BATCH)) \
		$(if $(IMGSZ),--imgsz $(IMGSZ)) --out $(OUT)/bench.json $(ARGS)

# The reproducible benchmark scripts; each writes benchmarks/results/*.json and *.md.
benchmarks: install
	$(PY) benchmarks/compile_yolov5.py
	$(PY) benchmarks/latency.py

# The accuracy benchmarks: the first two fine-tune (about 50 and 60 min on 2 CPU cores); the
# one-shot study trains nothing (about 20 min); the short fine-tune study about 25 min.
benchmarks-accuracy: install $(SHAPES)
	$(PY) benchmarks/accuracy.py
	$(PY) benchmarks/budget.py
	$(PY) benchmarks/oneshot.py
	$(PY) benchmarks/allocation.py
	$(PY) benchmarks/short_finetune.py
	$(PY) benchmarks/demo_budget.py
	$(PY) benchmarks/demo_seeds.py
	$(PY) benchmarks/mixed_precision.py
	$(PY) benchmarks/demo_batch.py

clean:
	rm -rf runs .pytest_cache
