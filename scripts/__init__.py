"""The commands besides training, each run from the repository root as `python -m scripts.NAME` (--help lists its
arguments): evaluate, prepare_data, plot_strengths, bench, memory_plan, gpu_check."""
