"""The jobs the round driver starts besides training: sampling and rejection sampling (sample.py), evaluation
(evaluate.py), reward scoring (scoring.py), averaging (average.py); each a script with its own command line, run
under torchrun or python. They use the trainer's model building and targets (llama_posttrain/train/), never the
driver (llama_posttrain/driver/)."""
