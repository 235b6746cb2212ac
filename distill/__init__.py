"""
The machinery a training run needs around trb.py, one module each: config (every key), tracking (report_to),
checkpoints (atomic checkpoints, resume, logs), synthetic_task (the embedded offline task), models (loading, dtypes,
stop ids), math_data (prompts, datasets, answer checking), memory_plan (memory per GPU from configs), qwen3 (an offline
Qwen3-sized tokenizer), fast (static caches, the compiled decode step, the chunked loss), vllm_engine (TRB's blend in
vLLM), evaluation (the run's decoder, held-out pass@1) and compare (methods over seeds). Nothing here imports
train_small.py, train_fsdp.py or scripts/ (tests/test_layers.py).
"""
