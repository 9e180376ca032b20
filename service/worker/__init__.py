"""The worker process: its loop (:mod:`.loop`), batch assembly (:mod:`.batching`),
progress (:mod:`.progress`), result storage (:mod:`.results`) and the runners that hold
models (:mod:`.runners`). Only this package imports torch and diffusers."""
