# `make run` / `make test` do all the set-up on a fresh machine (only Python needed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch (a local file on the project's machines); set TORCH_SPEC="torch" for a CUDA build.
TORCH_SPEC ?= torch==2.13.0
RUN_CONFIG ?= configs/quickstart.yaml
# one pytest-xdist worker per core (tests/conftest.py gives each worker one torch thread); loadgroup hands out one
# test at a time (no test here has an xdist_group), slow tests first (tests/conftest.py), so no long test starts last
PYTEST_ARGS ?= -n auto --dist loadgroup

.PHONY: install run test test-anywhere test-fast test-learning mutate check-mutants clean-runs

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) main.py fit --config $(RUN_CONFIG)

test: install
	$(PY) -m pytest -q -m "not learning" $(PYTEST_ARGS)

# the tests that compare with numbers stored on another machine (marked `stored_numbers`) once more, on torch's
# plain C++ kernels instead of this CPU's SIMD ones and with every core's threads in one process (`test` runs one
# thread per worker): they must pass on any CPU (.ci/run runs this after `test`)
test-anywhere: install
	ATEN_CPU_CAPABILITY=default $(PY) -m pytest -q -m stored_numbers -p no:xdist

test-fast: install
	$(PY) -m pytest -q -m "not slow and not learning" $(PYTEST_ARGS)

# the minutes-long learning tests (tests marked `learning`, e.g. Uni-MoE's three stages): not in `test` or CI
test-learning: install
	$(PY) -m pytest -q -m learning $(PYTEST_ARGS)

# Mutation testing (docs/testing.md), not part of `test` or CI: the functions every reported number rests on,
# each mutant run against the tests that reach it ([tool.mutmut] in pyproject.toml), at low priority.
MUTATE_JOBS ?= 2
MUTANTS ?= "lightning_moe.metrics.*" \
	"lightning_moe.layers.routing.x__balance_terms__mutmut_*" "lightning_moe.layers.routing.x_load_balancing_loss__mutmut_*" \
	"lightning_moe.layers.routing.x_router_z_loss__mutmut_*" \
	"lightning_moe.methods.distill.x_distillation_kl__mutmut_*" "lightning_moe.methods.distill.x_sequence_logprobs__mutmut_*" \
	"lightning_moe.methods.distill.x_dpo_loss__mutmut_*" "lightning_moe.methods.distill.x_kto_pair_loss__mutmut_*" \
	"lightning_moe.experiments.conflict.x_learnt_domains__mutmut_*" \
	"lightning_moe.experiments.conflict.x_conflicted_domains__mutmut_*" \
	"lightning_moe.experiments.conflict.x_summarise__mutmut_*" "lightning_moe.experiments.distill.x_verdict_lines__mutmut_*"

mutate: install
	$(PY) -m pip install --quiet -e ".[test,mutate]"
	rm -rf mutants
	OMP_NUM_THREADS=1 nice -n 19 $(VENV)/bin/mutmut run --max-children $(MUTATE_JOBS) $(MUTANTS)
	$(VENV)/bin/mutmut results

# The named mutants (tests/mutants/check_named_mutants.py, docs/testing.md): each applied to a copy of the
# repository must fail the tests that guard it.
check-mutants: install
	OMP_NUM_THREADS=1 $(PY) tests/mutants/check_named_mutants.py

clean-runs:
	rm -rf runs
