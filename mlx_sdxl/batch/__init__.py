"""`mlx-sdxl batch`: a file of jobs, made resumably, on one machine or spread over several
with MLX's distributed engine (`mx.distributed`, started by `mlx.launch`).

- `jobs.py`: the job file (JSON Lines or one prompt a line) → jobs with line numbers
- `options.py`: a job's options read by `generate`'s own parser and checks
- `tasks.py`: one image per task, its deterministic name and identifying settings
- `work.py`: making a task's image the way `generate` does; what a rank holds
- `local.py`: running tasks in this process
- `ledger.py`, `progress.py`: counts, `DIR/batch-log.jsonl`, one progress bar
- `comm.py`: messages between ranks over `mx.distributed.send` / `recv`
- `spread.py`: data-parallel: rank 0 hands each task to whichever rank is free
- `stages.py`: stage-parallel: base on rank 0, refiner and VAE on rank 1, pipelined
- `cli.py`: the command line and exit status
"""
