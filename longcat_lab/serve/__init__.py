"""`longcat-lab serve`: an OpenAI-compatible HTTP server for a checkpoint (docs/design.md §7.2).

`request` checks chat requests and renders them with the chat template; `scheduler` decodes them with continuous
batching on one worker thread (`inference.batch`); `engine` puts the two behind one object; `metrics` keeps the
Prometheus counters and histograms; `app` is the FastAPI application and runs it with uvicorn. fastapi and uvicorn
(the `serve` extra) are imported only by `app`; the subcommand itself is `longcat_lab.cli.serve`.
"""
