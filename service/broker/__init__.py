"""Everything that speaks to Redis: key names, Lua scripts, connections, the queue's two
sides (:mod:`.producer` for the API, :mod:`.consumer` for workers, :mod:`.wire` between
them), cluster slot routing, reconciliation after a failover, and the private server
that ``clusca serve`` starts. Nothing here imports the API or the worker."""
