"""torch.distributed.checkpoint storage plugins that write and read Hugging Face safetensors.

```python
import torch.distributed.checkpoint as dcp
from fastadapter.dcp import StorageReader, StorageWriter

dcp.save(model.state_dict(), storage_writer=StorageWriter("ckpt/step-100"))   # every rank
dcp.load(state_dict, storage_reader=StorageReader("ckpt/step-100"))         # any world size
```

`StorageWriter` writes a consolidated checkpoint (full tensors, `model.safetensors` or shards + index,
what `from_pretrained` and `safe_open` read) in one pass: every rank writes its own chunks straight into
the final files. `StorageReader` reads any safetensors checkpoint into any sharding.
"""

from __future__ import annotations

from .reader import StorageReader
from .writer import StorageWriter

__all__ = ["StorageReader", "StorageWriter"]
