"""taskqueue's service: the rpc handler and the workers (``taskqueue[server]``)."""
