"""Serving: the server's side of actdata, one job per module.

main (Hydra entry, `serve`), process (`ServerProcess`), stopping (stop signals, parent watch), procs (logging,
parent-death, killing descendants), supervisor (restarts dead children), console (ready file, fill progress,
status line), litserve_compat (the only user of LitServe's private API), worker (the generator in LitServe's
device workers), app (assembles the app), answers (route context, error answers), limits (rows per request),
responses (response memory), routes_data / routes_status (the routes), page (the status page, status.html),
history (the last minutes of rates), guard (header size, API key), httpguard (limits in the HTTP protocol),
metrics (Prometheus counters).
"""
