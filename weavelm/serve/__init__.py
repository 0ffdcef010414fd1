"""`weavelm serve`: an OpenAI-compatible HTTP server on the step-level engine.

`protocol` (requests, responses, errors), `handling` (request -> token ids and sampling; output
-> text), `loop` (the engine loop and the TP followers), `metrics` (Prometheus), `app` (the
FastAPI routes), `server` (what each rank runs).
"""
