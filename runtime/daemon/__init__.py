"""The on-robot daemon (`vlm2vla-edge serve`) and its clients.

`service.Daemon` holds the loaded policy and the connected robot and runs one episode at a time;
`http_api` serves it as JSON over a Unix socket (TCP only with a token); `server.serve` adds systemd
readiness, watchdog pings and a clean SIGTERM; `client.DaemonClient` is what `do`, `status`, `stop`
and `reset` use. Everything here is stdlib plus the runtime itself.
"""
