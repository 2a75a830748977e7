"""Model averaging (Llama 3: average the models of runs with different data or hyperparameters).

    python llama_posttrain/jobs/average.py --out runs/avg CKPT_A CKPT_B CKPT_C [--weights 0.5 0.25 0.25] [--format hf]

Inputs are checkpoint folders in any format `llama.load_model` reads (native, Hugging Face, Meta);
they must share one model config and head and hold only finite values; anything else is refused.
The average is written native (or `--format hf`) in the inputs' dtype (`--dtype` when they differ).
`--out` may be new, empty or an earlier checkpoint (its other files are kept); any other non-empty
folder is refused. The average is taken tensor by tensor (fp64 accumulation), reading each tensor
of a native input lazily, so memory is about one model. An HF or Meta input is first loaded whole
(llama.load_model: names, RoPE layout, tied embeddings) and written as a native copy in a temp
folder beside --out, removed at the end: one model in memory at a time, one copy per input on disk.
`greedy_soup` (Wortsman et al., 2022) adds checkpoints best-first while a metric does not drop.

The average is the model a user ships, so it carries the inputs' tokenizer and chat template, and their
generation_config.json's sampling defaults (do_sample, temperature, top_p, ...: a hub Instruct model's),
with `--format hf` beside the stop ids: `llama.generate` and transformers use it on its own. The inputs
must agree on them: inputs whose tokenizers (compared by their vocabulary, special tokens and split
pattern), chat templates (llama.chat.template_in_dir) or sampling defaults differ, or of which only some
hold a tokenizer, are refused, naming both. Inputs without a tokenizer give an average without one
(printed). A tokenizer file already in --out that differs from the average's is refused unless
--replace-tokenizer. Every other file the inputs hold beside their weights (README.md, LICENSE, ...) is
copied where all hold it with the same content; the others are listed as not copied.
This file: the command line (llama_posttrain/jobs/configs.py AverageConfig); the run (`average_checkpoints`,
`greedy_soup`): llama_posttrain/jobs/averaging.py.
"""

from __future__ import annotations

from llama_posttrain.jobs.configs import AverageConfig, parse


def main(argv=None):
    args = parse(AverageConfig, argv, __doc__)  # flags, --config FILE, key=value (llama_posttrain/jobs/configs.py)
    from llama_posttrain.jobs.averaging import run  # torch and the checkpoints: after the config is read

    run(args)


if __name__ == "__main__":
    main()
