# Common commands. Each target installs what it needs into .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0

.PHONY: install serve serve-ray demo grid screenshot test lint image image-test format quality ablations ablations-turbo ablations-gtr speculative flops bench-cpu bench-gpu bench-gpu-service gpu-wheels train-digits info clean loadtest loadbench loadbench-flat fairbench scale-bench fuzz soak

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch is pinned to the CPU build on the dev/CI path; an open `torch` would pull CUDA wheels.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

SERVE_HOST ?= 0.0.0.0
serve: install  ## the HTTP service with the shipped digits model (uvicorn, in-process engine)
	@echo "marche serve on $(SERVE_HOST):8000 (0.0.0.0 = every interface; SERVE_HOST=127.0.0.1 for loopback only)"
	$(BIN)/marche serve --host $(SERVE_HOST) --port 8000

serve-ray: install  ## the same app under Ray Serve (one engine replica per GPU; REPLICAS=N)
	$(BIN)/marche serve --ray --host 0.0.0.0 --port 8000 $(if $(REPLICAS),--replicas $(REPLICAS))

demo: install  ## generate a grid of digits with the shipped model
	$(BIN)/marche generate --class-id 3 --num 16 --seed 0 --scale 4 --out out/grid.png

grid: install  ## the grid in docs/ENGINE.md: every class, seeds 0-7, exact MAR, default settings
	$(BIN)/marche generate $(foreach c,0 1 2 3 4 5 6 7 8 9,--class-id $(c)) --num 8 --seed 0 \
		--scale 3 --out docs/digits_mar.png

screenshot: install  ## docs/web.png: the web page after a compare run (needs chromium + chromium-driver)
	$(BIN)/python scripts/screenshot.py --class-name three --seed 1 --out docs/web.png

test: install  ## the whole test suite (CPU; ~16 min on 2 cores)
	$(BIN)/python -m pytest -q

# The Dockerfile built and run with podman on a machine with no Docker engine and no image
# registry (deploy/README.md): a debootstrap stand-in for its base, this machine's CPU torch
# wheel and CA bundle as build arguments; cached between runs.
image:  ## the image (marche-serve:latest) and the stand-ins it needs; prints its size and build time
	scripts/image.sh build

image-test: install image  ## the image's compose stack on the CPU (serve + Prometheus), checked from outside
	MARCHE_IMAGE=marche-serve:latest CONTAINERS_CONF=$(CURDIR)/deploy/podman/containers.conf \
		$(BIN)/python -m pytest -q tests/image

fuzz: install  ## schemathesis against the app's OpenAPI, 3000 examples per operation (CI: 300)
	MARCHE_FUZZ_EXAMPLES=3000 $(BIN)/python -m pytest -q tests/service/test_fuzz.py

soak: install  ## the soak test for 20 rounds (CI: 2): idle RSS within its bound
	MARCHE_SOAK_ROUNDS=20 $(BIN)/python -m pytest -q tests/service/test_reliability.py -k soak

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

quality: install
	$(BIN)/marche quality --mode mar --num 500 --json out/quality_mar.json

ablations: install  ## MAR vs MARché vs the paper's ablations on digits (~15 min on 2 cores)
	$(BIN)/marche ablations --num 200 --json out/ablations.json

ablations-turbo: install  ## each turbo knob alone and the presets, 500 digits (~2.5 h on 2 cores; ONLY="head cache" for one row, MAR is kept and reused)
	$(BIN)/marche ablations --set turbo --num 500 $(if $(ONLY),--only "$(ONLY)") \
		--reference out/mar_reference_500.safetensors --json out/ablations_turbo.json

ablations-gtr: install  ## GtR on turbo, the quality / fast candidates, 1,000 digits (MAR ~65 min once, then 5-25 min a row on 2 cores; ONLY=... as above)
	$(BIN)/marche ablations --set gtr --num 1000 $(if $(ONLY),--only "$(ONLY)") \
		--reference out/mar_reference_1000.safetensors --json out/ablations_gtr.json

speculative: install  ## the self-speculative exact head on digits vs exact sampling (~5 min on 2 cores)
	$(BIN)/marche speculative --json out/speculative.json

flops: install  ## FLOPs per image per phase, MAR-B/L/H, every mode (meta device, no GPU needed)
	$(BIN)/marche bench --flops --model mar_base,mar_large,mar_huge --json out/flops.json

bench-cpu: install  ## MAR-B random weights, 64 steps, cfg 2.9, fp32, modes interleaved: batch 1 (~17 min), then 16 (~1.5 h)
	$(BIN)/marche bench --model mar_base --batch 1 --device cpu --repeats 2 --json out/bench_cpu_b1.json
	$(BIN)/marche bench --model mar_base --batch 16 --device cpu --repeats 1 --json out/bench_cpu_b16.json

bench-gpu:  ## on a CUDA node: one command < 9 min: CUDA tests, MAR-B/L/H eager vs CUDA graphs at batch 128, profile, batch 1/4/16
	$(PYTHON) scripts/bench_gpu.py gpu --out out/gpu

bench-gpu-service:  ## on a CUDA node: marche serve on MAR-B under the load bench (real engine), < 9 min
	$(PYTHON) scripts/bench_gpu.py service --out out/gpu

gpu-wheels:  ## here: the wheels bench-gpu-service needs on a lent device, whose image lacks FastAPI and pydantic (.whl/)
	scripts/gpu_wheels.sh

# The shipped weights, in three seeded stages (~70 + ~37 + ~40 min on a 2-core CPU).
train-digits: install
	$(BIN)/python -m engine.train.train_digits --out out/digits_stage1.safetensors
	$(BIN)/python -m engine.train.train_digits --init out/digits_stage1.safetensors --max-shift 0 \
		--steps 2400 --lr 3e-4 --seed 1 --out out/digits_stage2.safetensors
	$(BIN)/python -m engine.train.train_digits --init out/digits_stage2.safetensors --max-shift 0 \
		--steps 2400 --lr 3e-4 --seed 2 --mask-schedule cosine --out out/digits.safetensors

info: install
	$(BIN)/marche info

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache *.egg-info

# Load test a server that is already running (`marche serve` or compose); starts nothing itself.
HOST     ?= http://127.0.0.1:8000
USERS    ?= 8
RATE     ?= 2
DURATION ?= 60s
# extra flags, e.g. LOCUST_ARGS="--slo-p95-ms 5000 --slo-min-rps 1"
LOCUST_ARGS ?=

# Open-loop Poisson load, static vs continuous batching, one server at a time (starts them
# itself; MARCHE_* variables reach the servers). JSON, table and PNG in docs/results/.
LOADBENCH_ARGS ?= --steps 32 --duration 90 --capacity-s 40
loadbench: install  ## static vs continuous at 50/80/95% of capacity (~15 min on this CPU)
	$(BIN)/python -m loadtest.loadbench $(LOADBENCH_ARGS) --out docs/results/loadbench

# The scheduler in its regime: the same stack on a synthetic engine whose step time is flat in
# rows (loadtest/flat_engine.py: MAR-B's H200 curve), continuous batching at 50/80/95 %.
loadbench-flat: install  ## continuous batching on a flat-step engine (~6 min)
	$(BIN)/python -m loadtest.loadbench --engine flat --schedulers continuous --steps 64 \
		--duration 60 --capacity-s 30 --out docs/results/loadbench_flat

# Fair scheduling (docs/SERVING.md#fair-scheduling-measured): fifo, fair and deadline servers on
# the same open-loop arrivals, side by side (the flat engine's steps sleep, so all three run at
# once; the digits engine's take the CPU, so each round runs them in turn). JSON, tables, plots
# in docs/results/fairbench/.
fairbench: install  ## fifo vs fair vs deadline: mixed load and a two-tenant flood, flat engine then digits (~45 min)
	$(BIN)/python -m loadtest.fairbench --engine flat --workload mixed --together --duration 600
	$(BIN)/python -m loadtest.fairbench --engine flat --workload tenants --together --duration 300 --load 1.5
	$(BIN)/python -m loadtest.fairbench --engine real --workload mixed --duration 240 --rounds 3

# Scale-out on a local multi-node Ray cluster (fake GPUs): throughput 1 vs 2 replicas, default vs
# work-aware routing, autoscaling, a rolling upgrade and a node loss under load. Run it alone.
scale-bench: install  ## the scale-out proofs (~30 min on 2 cores; PHASES=routing for one)
	$(BIN)/python -m loadtest.scale_bench $(if $(PHASES),--phases $(PHASES))

loadtest: install  ## Locust headless against $(HOST); SLO report in loadtest/results/
	mkdir -p loadtest/results
	$(BIN)/locust -f loadtest/locustfile.py --headless -u $(USERS) -r $(RATE) -t $(DURATION) \
		--host $(HOST) --stop-timeout 60 --csv loadtest/results/run \
		--html loadtest/results/report.html $(LOCUST_ARGS)
