"""The jobs the round driver starts besides training: rejection sampling (sample.py), evaluation (evaluate.py) and
averaging (average.py), each a script with its own command line, run under torchrun or python. As the trainer's
entry points (llama_posttrain/train/sft.py and sft_objective.py): the script holds the command line of its config
(configs.py, torch-free: `--help` and a config error answer at once) and `main`, whose one deferred import is its
run, with torch at its top: sampling.py, evaluation.py, averaging.py; reward scoring (scoring.py) and the vLLM
engine (vllm_engine.py) are theirs. They use the trainer's model building and targets (llama_posttrain/train/),
never the driver (llama_posttrain/driver/)."""
