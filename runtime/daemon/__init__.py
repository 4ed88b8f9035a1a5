"""The on-robot daemon (`vlm2vla-edge serve`) and its clients.

`service.Daemon` holds the loaded policy and the connected robot and runs one episode at a time;
`http_api` is its JSON API as a Starlette app, `server` serves it with uvicorn over a Unix socket (TCP
only with a token) and adds systemd readiness, watchdog pings and a clean SIGTERM; `priority` keeps
the e-stop's thread ahead of the model's; `metrics` exports Prometheus metrics through
prometheus_client; `client.DaemonClient` (standard library only) is what `do`, `status`, `stop` and
`reset` use.
"""
