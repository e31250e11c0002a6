"""Test-session set-up shared by every test module.

No test may reach the model hub: the variables are set at import time, before any test module imports
transformers or huggingface_hub (both read them once, when first imported). fastadapter itself must never
need the network; running every save under these settings is how the suite checks that.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Two cores: more torch threads only add contention for the tiny models used here.
os.environ.setdefault("OMP_NUM_THREADS", "1")
