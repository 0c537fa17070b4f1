"""`mlx-sdxl serve`: AUTOMATIC1111's /sdapi/v1 API, a web page and live previews.

- `cli.py`: the command and its flags
- `config.py`: what a server is configured with (models, folders, limits, auth)
- `app.py`: the FastAPI application; `api_generate.py`, `api_info.py`: its routes
- `guards.py`: HTTP Basic auth (constant time) and the body-size limit
- `schemas.py`, `requests.py`: request bodies, and the checks that turn one into a job
- `service.py`, `worker.py`: the parts together; one FIFO queue and the thread that owns the models
- `models.py`, `folders.py`: the pipeline, checkpoints, LoRAs and embeddings, names resolved in folders
- `jobs.py`, `state.py`, `previews.py`: running a job, progress, interrupt/skip, previews
- `samplers.py`, `encoding.py`, `responses.py`, `outputs.py`: sampler names, images in and out, responses, saving
- `static/`: the page (plain HTML, CSS and JavaScript)

FastAPI and uvicorn come with the `server` extra; nothing here imports them at package import.
"""
