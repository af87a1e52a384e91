"""orcd-server: the HTTP API and the `orcd-worker` command line."""
