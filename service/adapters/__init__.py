"""LoRA adapters as the service stores, lists and checks them, without torch (the API imports this).

:mod:`.files` reads what an adapter file declares (its safetensors header and PEFT config);
:mod:`.store` is the folder of each model's adapters, where names become files and never paths.
The worker loads them into its model's adapter bank (``service/worker/adapters.py``).
"""

from service.adapters.files import AdapterFileError, AdapterInfo, inspect_adapter
from service.adapters.store import AdapterStore, AdapterStoreError, shipped_adapters_dir

__all__ = ["AdapterFileError", "AdapterInfo", "AdapterStore", "AdapterStoreError", "inspect_adapter",
           "shipped_adapters_dir"]
