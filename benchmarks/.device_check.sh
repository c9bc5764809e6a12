set -x
nproc; python -c "import jax, torch, transformers, flax; print(jax.__version__, torch.__version__, transformers.__version__)" || exit 3
export JAX_PLATFORMS=cpu
( time python -m pytest -q -p no:cacheprovider tests/test_losses.py tests/test_student.py tests/test_train_step.py 2>&1 | tail -3 ) 2>&1
python benchmarks/bench_train_step.py --threads 16 2>&1 | grep -v "^\[transformers\]"
