"""The round driver: the pipeline's config (pipeline_config.py) and run folder (pipeline.py), the Llama 3 recipe's
stages (stages.py, recipe.py) and the jobs they start (stage_jobs.py), the checks before the first job
(preflight.py), the launchers (launch.py, launch_ray.py, processes.py), the report (report.py, plots.py) and the
memory plan (plan.py, its arithmetic in memory.py). It holds no model: every stage that touches one is a
job (llama_posttrain/train/ for training, llama_posttrain/jobs/ for the rest), started by its script's path."""
