"""`longcat-lab serve`: an OpenAI-compatible HTTP server for a checkpoint (docs/design.md §7.2).

`engine` validates chat requests, renders them with the chat template and runs generation on one worker thread
(requests queue in arrival order); `metrics` keeps the Prometheus counters; `app` is the FastAPI application and
runs it with uvicorn. fastapi and uvicorn (the `serve` extra) are imported only by `app`; the subcommand itself is
`longcat_lab.cli.serve`.
"""
