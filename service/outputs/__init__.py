"""What a finished job's outputs become: encoded bytes (:mod:`.encode`) and where large
ones are kept (:mod:`.store`). Shared by the worker, which writes them, and the API,
which serves them."""
